// The optional native module (native/qemu_snap_native.c), built at install
// by scripts/build-native.mjs. Each user has a pure-JS fallback, so a
// machine without a compiler runs qemu-snap, only slower.
// QEMU_SNAP_NATIVE=0 turns it off (the tests compare both paths).
import * as path from 'node:path';

export interface NativeModule {
  /** F_SETPIPE_SZ on `fd`; returns the size granted. Throws with the errno's code. */
  pipeSize(fd: number, bytes: number): number;
  /** A read-only mapping of the file's bytes [offset, offset+length); offset page-aligned. Unmapped when collected. */
  mapFile(fd: number, offset: number, length: number): Buffer;
  /** Drops the whole pages inside `view` from this process's memory (they stay in the page cache). */
  dropPages(view: Buffer): void;
  /**
   * Writes the pieces `segments` describes, in order, whole: `count`
   * triples (index into `buffers`, offset, length). Blocks until done, or,
   * given `maxWaitMs`, until a full non-blocking descriptor has kept it
   * waiting that long in all. Returns the bytes written. At most 16 buffers.
   */
  writeSegments(fd: number, buffers: Buffer[], segments: Float64Array, count: number, maxWaitMs?: number): number;
  /**
   * poll(2) for input on `fd` for at most `timeoutMs`: true when a read
   * would not block (data, or a hang-up it then reports). Absent in older builds.
   */
  waitReadable?(fd: number, timeoutMs: number): boolean;
  /** O_NONBLOCK on the descriptor's open file. */
  setNonBlocking(fd: number): void;
  /** _exit(2): ends the process without joining its threads. */
  exitNow(code: number): never;
  /** linkat(2) of the open file `fd` (an O_TMPFILE one) at `path`, through /proc/self/fd; EEXIST when `path` exists. */
  linkFd(fd: number, path: string): void;
  /**
   * pwritev(2) of `length` bytes of what `count` segments describe, from
   * `skip` bytes into them, at file offset `position`, resumed after short
   * writes. Returns the bytes written.
   */
  pwriteSegments(fd: number, position: number, buffers: Buffer[], segments: Float64Array, count: number, skip: number, length: number): number;
  /** Bytes of an XXH64 state buffer (allocate with Buffer.alloc: it must be 8-aligned). */
  readonly xxh64StateBytes: number;
  xxh64Reset(state: Buffer): void;
  xxh64Update(state: Buffer, data: Uint8Array): void;
  /** xxh64Update with the bytes `count` segments describe, in order. */
  xxh64UpdateSegments(state: Buffer, buffers: Buffer[], segments: Float64Array, count: number): void;
  /**
   * The bytes `count` segments describe, in order, copied to `dst` from its
   * start (it must hold them all); with `state`, also fed to that XXH64 as
   * they are copied. Returns the bytes copied. (Optional: a module built
   * before it lacks it.)
   */
  copySegments?(dst: Buffer, buffers: Buffer[], segments: Float64Array, count: number, state?: Buffer): number;
  /** The low 32 bits of XXH64 (seed 0) of what was fed since the reset. */
  xxh64Low(state: Buffer): number;
  /** socketpair(2): a connected AF_UNIX stream pair, blocking, close-on-exec; socket buffers of `bufferBytes` when given. */
  socketPair?(bufferBytes?: number): [number, number];
  /** sendmsg(2) of `data` on the socket `sockFd` with `fd` as SCM_RIGHTS (QMP getfd). Returns the bytes sent. */
  sendFd?(sockFd: number, fd: number, data: Buffer): number;
  /** `size` bytes at an address that is a multiple of `align` (posix_memalign), not zeroed; freed when collected. */
  alignedBuffer(size: number, align: number): Buffer;
  /** The buffer's address modulo `align`. */
  addressModulo(buf: Uint8Array, align: number): number;
  /** [memory, offset] alignment O_DIRECT needs on `fd` (statx STATX_DIOALIGN, BLKSSZGET), [0, 0] when unknown. */
  dioAlign(fd: number): [number, number];
  /**
   * A Linux AIO context (io_setup; kind 0, the default) or an io_uring
   * (io_uring_setup; kind 1) for `maxInFlight` requests, whose
   * completions call `onComplete(tag, result)` on the main loop, one call
   * each; result is the bytes done or -errno. Absent in older builds.
   */
  aioCreate?(maxInFlight: number, onComplete: (tag: number, result: number) => void, kind?: 0 | 1): object;
  /**
   * io_submit(2) (or an io_uring SQE) of one pwritev (write) or preadv of `buffers` at
   * `position`: true when submitted, false when maxInFlight requests are in
   * the kernel already. The buffers must stay alive until the completion.
   */
  aioSubmit?(engine: object, write: boolean, fd: number, position: number, buffers: Buffer[], tag: number): boolean;
  /** [in flight now, most in flight at once, submitted in all]. */
  aioStats?(engine: object): [number, number, number];
  /** Waits for what is in flight (io_destroy; io_uring_enter), no callbacks for it, and closes the context or ring and the eventfd. */
  aioDestroy?(engine: object): void;
}

let loaded: NativeModule | null | undefined;
let whyNot = '';
// dist/src/util/native.js → build/Release at the package root.
const MODULE_FILE = path.join(__dirname, '..', '..', '..', 'build', 'Release', 'qemu_snap_native.node');

/** The native module, or null when it is not built or QEMU_SNAP_NATIVE=0. */
export function native(): NativeModule | null {
  if (loaded !== undefined) return loaded;
  if (process.env.QEMU_SNAP_NATIVE === '0') {
    whyNot = 'QEMU_SNAP_NATIVE=0';
    return (loaded = null);
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    loaded = require(MODULE_FILE) as NativeModule;
  } catch (err) {
    whyNot = (err as Error).message.split('\n')[0];
    loaded = null;
  }
  return loaded;
}

/** The file native() loaded, for a worker thread to load as well; null when native() is null. */
export function nativeModuleFile(): string | null {
  return native() === null ? null : MODULE_FILE;
}

/** Why native() is null ('' when it is not). */
export function nativeUnavailableReason(): string {
  native();
  return whyNot;
}
