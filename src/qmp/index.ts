// Driving QEMU over QMP: the client, and save/restore through a socketpair
// handed to QEMU with getfd.
export * from './client';
export { MigrationSettings, waitMigration, isTerminal, isInProgress, socketPair, passFd, closeFd, MigrationSetupError } from './migration';
export type { MigrationInfo, RunState } from './migration';
export { saveViaQmp, QmpSaveError } from './save';
export type { QmpSaveOptions, QmpSaveResult, QmpSaveProgress, QmpSaveMode, FailedSide } from './save';
export { restoreViaQmp, QmpRestoreError } from './restore';
export type { QmpRestoreOptions, QmpRestoreResult } from './restore';
