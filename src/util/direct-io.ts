// Host cache modes (QEMU's -drive cache=...) and direct I/O.
//
// QEMU's modes are three switches (block/block-backend.c, qemu-options.hx):
//
//   mode          cache.direct  writes durable at once  flushes
//   writeback     off           no                      yes   (the default)
//   none          on            no                      yes
//   writethrough  off           yes (O_DSYNC)           yes
//   directsync    on            yes (O_DSYNC)           yes
//   unsafe        off           no                      never
//
// cache.direct means O_DIRECT: data moves between the device and our own
// buffers without a page-cache copy, so buffers, file offsets and lengths
// must be aligned to what the file asks (statx STATX_DIOALIGN, BLKSSZGET
// for a block device, else 4096). Node's Buffers carry no alignment
// guarantee and JS cannot see an address: aligned memory comes from the
// native module, and O_DIRECT modes need it.
import * as fs from 'node:fs';
import { QemuSnapError } from '../errors';
import { native, nativeUnavailableReason } from './native';
import { LinuxAio } from './linux-aio';

export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];
export const AIO_MODES = ['threads', 'native', 'io_uring'] as const;
export type AioMode = (typeof AIO_MODES)[number];

export interface CachePolicy {
  mode: CacheMode;
  /** Guest data through O_DIRECT. */
  direct: boolean;
  /** Every write durable before it completes (O_DSYNC). */
  dsync: boolean;
  /** fsync before publishing (false only for unsafe). */
  flush: boolean;
}

export function cachePolicy(mode: CacheMode = 'writeback'): CachePolicy {
  return {
    mode,
    direct: mode === 'none' || mode === 'directsync',
    dsync: mode === 'writethrough' || mode === 'directsync',
    flush: mode !== 'unsafe',
  };
}

export function isCacheMode(s: string): s is CacheMode {
  return (CACHE_MODES as readonly string[]).includes(s);
}

export function isAioMode(s: string): s is AioMode {
  return (AIO_MODES as readonly string[]).includes(s);
}

/** A cache or aio mode this build or this file system cannot do. */
export class DirectIoError extends QemuSnapError {}

/**
 * Throws unless `mode` can run with `policy` here (`what`, e.g. "save", for
 * the message). `threads` is Node's thread pool. `native` (Linux AIO) and
 * `io_uring` go through the native module and serve the O_DIRECT I/O of
 * cache modes none and directsync: with `native`, as in QEMU, because the
 * kernel only does O_DIRECT I/O asynchronously; with `io_uring` because
 * that is all qemu-snap uses an engine for (QEMU would take it buffered).
 */
export function checkAioMode(mode: AioMode, policy: CachePolicy = cachePolicy(), what = 'qemu-snap'): void {
  if (mode === 'threads') return;
  if (!policy.direct) {
    const why =
      mode === 'native'
        ? 'Linux AIO is only asynchronous with O_DIRECT; QEMU likewise refuses aio=native without cache.direct=on'
        : 'qemu-snap uses io_uring for its O_DIRECT I/O only';
    throw new DirectIoError(`${what} --aio=${mode}: needs --cache=none or --cache=directsync (${why}), not --cache=${policy.mode}`);
  }
  if (mode === 'io_uring') {
    const state = ioUringKernelState();
    if (state.disabled) throw new DirectIoError(`${what} --aio=io_uring: ${state.text}; use --aio=native or --aio=threads`);
  }
  const mod = native();
  if (mod === null) throw new DirectIoError(`${what} --aio=${mode}: needs the native module (${nativeUnavailableReason()}); use --aio=threads`);
  if (mod.aioCreate === undefined) throw new DirectIoError(`${what} --aio=${mode}: the native module was built without it (rebuild it: npm run build:native); use --aio=threads`);
}

/** What the kernel says about io_uring (/proc/sys/kernel/io_uring_disabled, Linux 6.6+). */
function ioUringKernelState(): { disabled: boolean; text: string } {
  let v: string;
  try {
    v = fs.readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim();
  } catch {
    return { disabled: false, text: 'this kernel has no io_uring_disabled switch' };
  }
  if (v === '0' || v === '1') return { disabled: false, text: `io_uring_disabled=${v}` };
  return { disabled: true, text: `the kernel disables io_uring (/proc/sys/kernel/io_uring_disabled is ${v})` };
}

/** The I/O engine a DirectFile uses: Node's thread pool, or Linux AIO or io_uring with this many requests in the kernel at most. */
export interface DirectEngine {
  aio: AioMode;
  maxInFlight: number;
}

/** Alignment assumed when the file does not say. */
export const DEFAULT_DIO_ALIGN = 4096;

function pow2AtLeast(n: number, floor: number): number {
  let a = floor;
  while (a < n) a *= 2;
  return a;
}

/**
 * Opens `file` with O_DIRECT (and `flags`), as `what` (e.g. "save
 * --cache=none") for the messages. A file system without direct I/O (tmpfs)
 * fails the open with EINVAL: that becomes one line naming the mode and the
 * file, as QEMU says it. O_CREAT is refused here: on such a file system the
 * open would leave an empty file behind.
 */
export function openDirect(file: string, flags: number, what: string, shown: string = file, engine?: DirectEngine): DirectFile {
  const mod = native();
  if (mod === null) throw new DirectIoError(`${what}: direct I/O needs the native module for aligned buffers (${nativeUnavailableReason()}); use --cache=writeback or writethrough`);
  if ((flags & fs.constants.O_CREAT) !== 0) throw new RangeError('openDirect: O_CREAT is not allowed');
  let fd: number;
  try {
    fd = fs.openSync(file, flags | fs.constants.O_DIRECT);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'EINVAL') throw new DirectIoError(`${what}: ${shown}: the file system does not support O_DIRECT (direct I/O); use --cache=writeback`);
    throw new DirectIoError(`${what}: cannot open ${shown}: ${e.message}`);
  }
  const [mem, off] = mod.dioAlign(fd);
  // Page-aligned memory costs nothing and satisfies every device we know of.
  const memAlign = pow2AtLeast(mem || DEFAULT_DIO_ALIGN, DEFAULT_DIO_ALIGN);
  const offsetAlign = off || DEFAULT_DIO_ALIGN;
  let aio: LinuxAio | null = null;
  if (engine !== undefined && engine.aio !== 'threads') {
    try {
      aio = new LinuxAio(mod, engine.maxInFlight, engine.aio);
    } catch (err) {
      fs.closeSync(fd);
      // io_uring_disabled=1 and not in io_uring_group: EPERM.
      throw new DirectIoError(`${what} --aio=${engine.aio}: ${(err as Error).message}; use --aio=threads`);
    }
  }
  return new DirectFile(fd, file, memAlign, offsetAlign, aio);
}

/** `size`-byte buffers at `align`-aligned addresses (native posix_memalign). */
export function alignedAllocator(align: number): (size: number) => Buffer {
  const mod = native();
  if (mod === null) throw new DirectIoError(`aligned buffers need the native module (${nativeUnavailableReason()})`);
  return (size) => mod.alignedBuffer(size, align);
}

function writevAsync(fd: number, buffers: Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.writev(fd, buffers, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function readAsync(fd: number, out: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, out, at, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

/**
 * A file open with O_DIRECT. Writes and reads whose offset, length and
 * memory are aligned go straight to the thread pool, or to Linux AIO or
 * io_uring with --aio (one pwritev/pread each); any other is done through
 * an aligned bounce buffer, a partial
 * sector at either end read, patched and written back synchronously on
 * this thread so that no other write can slip in between (a partial sector
 * is only ever shared with another unaligned write: an aligned write that
 * covered it would overlap this one, and OrderedBlockWriter never issues
 * overlapping writes together).
 */
export class DirectFile {
  private readonly mod = native();
  closed = false;
  /** Writes and reads that needed the bounce buffer (for tests and stats). */
  bounced = 0;

  /**
   * `aio`: aligned reads and writes go through Linux AIO (--aio=native)
   * or io_uring instead of the thread pool; closed with the file.
   */
  constructor(readonly fd: number, readonly path: string, readonly memAlign: number, readonly offsetAlign: number, readonly aio: LinuxAio | null = null) {}

  private writevNow(slices: Buffer[], position: number): Promise<number> {
    return this.aio ? this.aio.pwritev(this.fd, slices, position) : writevAsync(this.fd, slices, position);
  }

  private readNow(out: Buffer, at: number, length: number, position: number): Promise<number> {
    return this.aio ? this.aio.preadv(this.fd, [out.subarray(at, at + length)], position) : readAsync(this.fd, out, at, length, position);
  }

  private aligned(b: Uint8Array): boolean {
    return b.length % this.offsetAlign === 0 && (this.mod === null || this.mod.addressModulo(b, this.memAlign) === 0);
  }

  async writev(position: number, slices: Buffer[], length: number): Promise<void> {
    let ok = position % this.offsetAlign === 0;
    for (let i = 0; ok && i < slices.length; i++) ok = this.aligned(slices[i]);
    if (!ok) return this.writeBounced(position, slices, length);
    const done = await this.writevNow(slices, position);
    if (done === length) return;
    if (done <= 0) throw Object.assign(new Error(`short O_DIRECT write at ${position}`), { code: 'EIO' });
    // Short (rare on regular files): the rest through the bounce path, which takes any remainder.
    const rest: Buffer[] = [];
    let skip = done;
    for (const s of slices) {
      if (skip >= s.length) skip -= s.length;
      else {
        rest.push(s.subarray(skip));
        skip = 0;
      }
    }
    this.writeBounced(position + done, rest, length - done);
  }

  private writeBounced(position: number, slices: Buffer[], length: number): void {
    this.bounced++;
    const a = this.offsetAlign;
    const start = Math.floor(position / a) * a;
    const end = Math.ceil((position + length) / a) * a;
    const buf = (this.mod as NonNullable<typeof this.mod>).alignedBuffer(end - start, this.memAlign);
    if (start < position) this.readSectorSync(buf, 0, start);
    if (end > position + length && !(start < position && end - a === start)) this.readSectorSync(buf, end - a - start, end - a);
    let at = position - start;
    for (const s of slices) at += s.copy(buf, at);
    let done = 0;
    while (done < buf.length) {
      const n = fs.writeSync(this.fd, buf, done, buf.length - done, start + done);
      if (n <= 0) throw Object.assign(new Error(`short O_DIRECT write at ${start + done}`), { code: 'EIO' });
      done += n;
    }
  }

  /** One aligned sector at `position` into buf[at..]: zeros past the end of the file. */
  private readSectorSync(buf: Buffer, at: number, position: number): void {
    const n = fs.readSync(this.fd, buf, at, this.offsetAlign, position);
    if (n < this.offsetAlign) buf.fill(0, at + n, at + this.offsetAlign);
  }

  /** `length` bytes at file `position` into out[at..]; zeros past the end of the file. */
  async read(out: Buffer, at: number, length: number, position: number): Promise<void> {
    if (length === 0) return;
    const a = this.offsetAlign;
    if (position % a === 0 && this.aligned(out.subarray(at, at + length))) {
      let done = 0;
      while (done < length) {
        const n = await this.readNow(out, at + done, length - done, position + done);
        if (n === 0) break;
        done += n;
        if (done % a !== 0) break; // the end of the file
      }
      if (done < length) out.fill(0, at + done, at + length);
      return;
    }
    this.bounced++;
    const start = Math.floor(position / a) * a;
    const end = Math.ceil((position + length) / a) * a;
    const buf = (this.mod as NonNullable<typeof this.mod>).alignedBuffer(end - start, this.memAlign);
    let done = 0;
    while (done < buf.length) {
      const n = await this.readNow(buf, done, buf.length - done, start + done);
      if (n === 0) break;
      done += n;
      if (done % a !== 0) break;
    }
    buf.fill(0, done);
    buf.copy(out, at, position - start, position - start + length);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    // Waits for requests still in the kernel before their descriptor goes.
    this.aio?.destroy();
    fs.closeSync(this.fd);
  }
}
