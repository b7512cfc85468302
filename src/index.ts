// qemu-snap's public API: the stages of the save and load pipelines, each a
// streamx stream, and the functions the CLI is built from.
export { QemuSnapError } from './errors';

// Stream codec (knows nothing of QCOW2).
export * from './migration';
export { RamRecordWriter, ramBlockName } from './migration/ram-writer';
export type { RamBlockName } from './migration/ram-writer';
export * from './migration/return-path';
export * from './migration/postcopy';

// QCOW2 engine (knows nothing of migration).
export * from './image';

// The buffer ring.
export * from './blockio';

// The snapshot layer joining them.
export { STVM_MAGIC, VMSTATE_HEADER_SIZE, BLOCK_ALIGNMENT, SnapshotFormatError, encodeSnapshotHeader, decodeSnapshotHeader, layoutRamBlocks } from './snapshot/layout';
export type { SnapshotHeader, RamBlockLayout } from './snapshot/layout';
export { SnapshotWriter, SnapshotSaveError } from './snapshot/snapshot-writer';
export type { SnapshotWriterOptions, SnapshotSummary } from './snapshot/snapshot-writer';
export { saveSnapshot, SaveTargetError, SaveAbortedError, ImageBlockTarget } from './snapshot/save';
export { finishSnapshotImage } from './snapshot/finish';
export { ChunkTracker } from './snapshot/chunk-tracker';
export { createLoadStream } from './snapshot/load-stream';
export type { LoadStreamOptions } from './snapshot/load-stream';
export type { SaveOptions, SaveResult } from './snapshot/save';
export { LoadEncoder } from './snapshot/load-encoder';
export type { LoadEncoderOptions } from './snapshot/load-encoder';
export { loadSnapshot, LoadError } from './snapshot/load';
export { REFUSAL_NOTICE, isRefusalNotice } from './snapshot/refusal';
export type { LoadOptions, LoadResult } from './snapshot/load';
export { openSnapshot, parseRecords } from './snapshot/snapshot-image';
export type { SnapshotContents } from './snapshot/snapshot-image';
export { describeFile, describeStream, describeImage, formatInfo } from './snapshot/info';
export type { Info, StreamInfo, ImageInfo, DeviceInfo } from './snapshot/info';
export { InputGate } from './snapshot/input-gate';
export { parseSize } from './util/size';
// pump as a promise, for pipelines that mix streamx and Node streams.
export { pumpAsync } from './util/pump';
export type { AnyStream } from './util/pump';
export { verifySnapshot, verifyChunks, StreamVerifier } from './snapshot/verify';
export type { VerifyResult } from './snapshot/verify';
export { ChunkDigester, DigestMismatchError, encodeDigestTable, decodeDigestHeader, decodeDigestTable, DIGEST_CHUNK_SIZE } from './snapshot/digests';
export { createChunkHasher } from './snapshot/chunk-hash';
export type { ChunkHasher, DigestAlgorithm } from './snapshot/chunk-hash';
export type { DigestTable } from './snapshot/digests';
export { FdReader } from './util/fd-reader';
export { FdWriter, isPipe } from './util/fd-writer';

// Driving QEMU over QMP: client, save and restore through getfd'd socketpairs.
export * from './qmp';
