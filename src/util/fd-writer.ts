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

export class FdWriter extends Writable {
  bytesWritten = 0;

  /**
   * Writes `data` whole, now, on this thread: the caller may reuse the
   * buffer when it returns. For a producer that would otherwise hand the
   * pool one chunk at a time: each pool write costs two cross-thread
   * wake-ups, and with a 1 MiB pipe the blocking write(2) itself rarely
   * sleeps. Not to be mixed with queued writes still in flight.
   */
  writeSync(data: Buffer): void {
    let at = 0;
    while (at < data.length) {
      let n: number;
      try {
        n = fs.writeSync(this.fd, data, at, data.length - at);
      } catch (err) {
        // A non-blocking pipe that is full: wait for the reader.
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
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
   * `segments` describes, whole, now. Null when the native module is not
   * built: use writeSync.
   */
  get segmentWriter(): ((buffers: Buffer[], segments: Float64Array, count: number) => void) | null {
    const mod = native();
    if (!mod) return null;
    return (buffers, segments, count) => {
      try {
        this.bytesWritten += mod.writeSegments(this.fd, buffers, segments, count);
      } catch (err) {
        throw FdWriteError.of(this.fd, err);
      }
    };
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
