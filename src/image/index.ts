export { Qcow2Image } from './qcow2';
export type { AllocatedRange, GuestDataFile, Qcow2CreateOptions, Qcow2FlushOptions, Qcow2OpenOptions } from './qcow2';
export { Qcow2Error } from './errors';
