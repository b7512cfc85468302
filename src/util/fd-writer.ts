// Writing a pipe from libuv's thread pool. process.stdout writes pipes
// synchronously on Linux: each 1 MiB chunk blocks the main thread until the
// reader has taken it, so encoding and writing never overlap. Here the
// write(2) runs in the pool while the main thread prepares the next chunks;
// queued chunks go out together in one writev(2). One call at a time: two
// writes in flight to one pipe could interleave.
import * as fs from 'node:fs';
import { Writable } from 'streamx';
import { QemuSnapError } from '../errors';
import { native } from './native';

export class FdWriteError extends QemuSnapError {
  constructor(readonly fd: number, readonly code: string, detail: string) {
    super(code === 'EPIPE' ? `fd ${fd}: the reader closed the pipe (EPIPE)` : `fd ${fd}: ${detail}`);
  }

  /** From a failed write's error (Node's or the native module's: both carry the errno name as `code`). */
  static of(fd: number, err: unknown): FdWriteError {
    return new FdWriteError(fd, (err as NodeJS.ErrnoException).code ?? 'EIO', (err as Error).message);
  }
}

/** True when `fd` is a pipe (FIFO). */
export function isPipe(fd: number): boolean {
  try {
    return fs.fstatSync(fd).isFIFO();
  } catch {
    return false;
  }
}

/** Sleeps the thread ~1 ms (a non-blocking pipe is full and there is no event loop turn to wait in). */
const napCell = new Int32Array(new SharedArrayBuffer(4));
function nap(): void {
  Atomics.wait(napCell, 0, 0, 1);
}

/**
 * How long a synchronous write waits for a full pipe before it keeps the
 * rest for later (FdWriter.flushPending) and returns: long enough that a
 * reader which is merely slower than us costs no copies, short enough that
 * an interrupt is seen promptly (the main thread runs no signal handler
 * while it waits here).
 */
export const SYNC_WAIT_MS = 50;

/**
 * O_NONBLOCK on `fd` (a pipe we write synchronously): a blocking write(2)
 * to a full pipe sleeps in the kernel, restarted after every signal, until
 * the reader takes the data, which may be never. Through the native module,
 * or else by creating process.stdout (libuv makes a pipe non-blocking when
 * it opens it). Returns whether it was done.
 */
export function makeNonBlocking(fd: number): boolean {
  const mod = native();
  if (mod) {
    try {
      mod.setNonBlocking(fd);
      return true;
    } catch {
      return false;
    }
  }
  if (fd === 1) {
    void process.stdout;
    return true;
  }
  return false;
}

export class FdWriter extends Writable {
  bytesWritten = 0;
  /** Bytes writeSync could not write within SYNC_WAIT_MS (copies, in order): flushPending writes them. */
  private pending: Buffer[] = [];
  private cancelled: Error | null = null;
  private readonly oneSegment = new Float64Array([0, 0, 0]);

  /** Bytes kept for flushPending. */
  get pendingBytes(): number {
    let n = 0;
    for (const b of this.pending) n += b.length;
    return n;
  }

  /** Makes a waiting flushPending reject with `err` (an interrupt: the reader may never come back). */
  cancel(err: Error): void {
    this.cancelled ??= err;
  }

  /**
   * Writes `data` now, on this thread: the caller may reuse the buffer when
   * it returns. For a producer that would otherwise hand the pool one chunk
   * at a time: each pool write costs two cross-thread wake-ups, and with a
   * 1 MiB pipe the write rarely waits. On a non-blocking pipe that stays full
   * for SYNC_WAIT_MS, the rest is copied aside and the caller must await
   * flushPending() before its event loop may starve again. Not to be mixed
   * with queued writes still in flight.
   */
  writeSync(data: Buffer): void {
    if (native()) {
      this.oneSegment[1] = 0;
      this.oneSegment[2] = data.length;
      this.writeSegmentsNow([data], this.oneSegment, 1);
      return;
    }
    if (this.pending.length > 0) {
      this.pending.push(Buffer.from(data));
      return;
    }
    let at = 0;
    let waited = 0;
    while (at < data.length) {
      let n: number;
      try {
        n = fs.writeSync(this.fd, data, at, data.length - at);
      } catch (err) {
        // A non-blocking pipe that is full: wait for the reader, a while.
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
          if (waited++ >= SYNC_WAIT_MS) {
            this.pending.push(Buffer.from(data.subarray(at)));
            return;
          }
          nap();
          continue;
        }
        throw FdWriteError.of(this.fd, err);
      }
      at += n;
      this.bytesWritten += n;
    }
  }

  /**
   * Gathered writeSync (the native module's writeSegments): the pieces
   * `segments` describes, now (what a full pipe did not take within
   * SYNC_WAIT_MS is copied aside, as in writeSync). Null when the native
   * module is not built: use writeSync.
   */
  get segmentWriter(): ((buffers: Buffer[], segments: Float64Array, count: number) => void) | null {
    if (!native()) return null;
    return (buffers, segments, count) => this.writeSegmentsNow(buffers, segments, count);
  }

  private writeSegmentsNow(buffers: Buffer[], segments: Float64Array, count: number): void {
    const mod = native();
    if (!mod) throw new Error('writeSegmentsNow without the native module');
    let written = 0;
    if (this.pending.length === 0) {
      try {
        written = mod.writeSegments(this.fd, buffers, segments, count, SYNC_WAIT_MS);
      } catch (err) {
        throw FdWriteError.of(this.fd, err);
      }
      this.bytesWritten += written;
    }
    // What the pipe did not take: copied aside, in order.
    let skip = written;
    for (let i = 0; i < count; i++) {
      const len = segments[i * 3 + 2];
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const start = segments[i * 3 + 1] + skip;
      this.pending.push(Buffer.from(buffers[segments[i * 3]].subarray(start, segments[i * 3 + 1] + len)));
      skip = 0;
    }
  }

  /**
   * Null when nothing is kept aside; otherwise a promise that writes it all,
   * returning to the event loop between waits of at most SYNC_WAIT_MS, and
   * rejects when cancel() is called meanwhile.
   */
  flushPending(): Promise<void> | null {
    if (this.pending.length === 0) return null;
    return this.drainPending();
  }

  private async drainPending(): Promise<void> {
    const mod = native();
    while (this.pending.length > 0) {
      if (this.cancelled) throw this.cancelled;
      const head = this.pending[0];
      let n = 0;
      try {
        if (mod) {
          this.oneSegment[1] = 0;
          this.oneSegment[2] = head.length;
          n = mod.writeSegments(this.fd, [head], this.oneSegment, 1, SYNC_WAIT_MS);
        } else {
          n = fs.writeSync(this.fd, head, 0, head.length);
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw FdWriteError.of(this.fd, err);
      }
      this.bytesWritten += n;
      if (n === head.length) this.pending.shift();
      else {
        if (n > 0) this.pending[0] = head.subarray(n);
        // A turn of the event loop: signals, an abort.
        await new Promise((resolve) => setTimeout(resolve, mod ? 0 : 1));
      }
    }
  }

  constructor(readonly fd: number) {
    super({ highWaterMark: 2 << 20, byteLength: (b: unknown) => (b as Buffer).length });
  }

  override _writev(batch: unknown[], cb: (err: Error | null) => void): void {
    this.writeAll(batch as Buffer[], cb);
  }

  private writeAll(bufs: Buffer[], cb: (err: Error | null) => void): void {
    fs.writev(this.fd, bufs, null, (err, n) => {
      if (err) {
        // A non-blocking pipe that is full: try again shortly.
        if (err.code === 'EAGAIN') return void setTimeout(() => this.writeAll(bufs, cb), 1);
        return cb(FdWriteError.of(this.fd, err));
      }
      this.bytesWritten += n;
      // Partial write: drop what went out and write the rest.
      let rest = n;
      let i = 0;
      while (i < bufs.length && rest >= bufs[i].length) rest -= bufs[i++].length;
      if (i === bufs.length) return cb(null);
      const left = bufs.slice(i);
      left[0] = left[0].subarray(rest);
      this.writeAll(left, cb);
    });
  }
}
