export * from './constants';
export * from './records';
export * from './errors';
export { MigrationFramer, commandName, isValidPageSize } from './framer';
export type { MigrationFramerOptions } from './framer';
export * from './encoder';
