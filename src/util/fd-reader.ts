// Reading a pipe on a worker thread. Node reads a pipe on the main thread
// in 64 KiB pieces, so the syscalls serialise with the parsing and every
// piece costs a trip through the streams. A worker doing blocking reads
// gathers them into 512 KiB chunks (transferred, not copied) while the main
// thread parses the previous ones.
import * as fs from 'node:fs';
import { MessageChannel, MessagePort, Worker } from 'node:worker_threads';
import { Readable } from 'streamx';
import { QemuSnapError } from '../errors';
import { native, nativeModuleFile } from './native';

/** Reading the fd failed (an error other than EAGAIN); `code` is the errno name. */
export class FdStreamError extends QemuSnapError {
  constructor(readonly fd: number, readonly code: string, detail: string) {
    super(`fd ${fd}: ${detail}`);
  }
}

// The worker loops on blocking reads. It sends a chunk when it is full, or
// when a read returned less than a full pipe and nothing more comes within
// dryWaitMs: the peer has nothing more right now (a source waiting for SHUT
// must see its tail processed). The wait matters because we read faster
// than QEMU writes: its next piece is usually microseconds away, and
// handing over every part-filled chunk at once sent 1.3-1.5 chunks per full
// one, each a 512 KiB buffer for ~200 KiB of stream (measured: 105-121 MiB
// peak RSS instead of 94-99, 2800 messages per GiB instead of 2050).
// Without the native module's poll(2) it does not wait.
// credits[0] counts the bytes it may still send before main asks for more
// (bytes, not chunks: a writer of small pieces must not starve it).
const READER_SRC = `
const { parentPort, workerData, receiveMessageOnPort } = require('node:worker_threads');
const fs = require('node:fs');
const { fd, chunkSize, credits, pipeSize, recycled, nativeFile, dryWaitMs } = workerData;
let waitReadable = null;
if (nativeFile !== null && dryWaitMs > 0) {
  try { waitReadable = require(nativeFile).waitReadable || null; } catch { waitReadable = null; }
}
// A chunk main is done with comes back here: filling it again costs no page faults.
const fresh = () => {
  const m = receiveMessageOnPort(recycled);
  return m ? Buffer.from(m.message) : Buffer.allocUnsafeSlow(chunkSize);
};
const pause = new Int32Array(new SharedArrayBuffer(4));
let backoff = 0.02;
let buf = Buffer.allocUnsafeSlow(chunkSize);
let len = 0;
const send = () => {
  Atomics.sub(credits, 0, len);
  const ab = buf.buffer;
  parentPort.postMessage({ ab, len }, [ab]);
  buf = fresh();
  len = 0;
};
for (;;) {
  for (let c = Atomics.load(credits, 0); c <= 0 && Atomics.load(credits, 1) === 0; c = Atomics.load(credits, 0)) Atomics.wait(credits, 0, c);
  // credits[1]: main destroyed the reader (and woke a blocked read with a byte of its own).
  if (Atomics.load(credits, 1) !== 0) break;
  let n;
  // A read returns at most what the pipe holds: less than that, or than
  // asked for, means the pipe ran dry.
  const full = Math.min(pipeSize, chunkSize - len);
  try {
    n = fs.readSync(fd, buf, len, chunkSize - len, null);
  } catch (e) {
    if (e.code === 'EAGAIN') { Atomics.wait(pause, 0, 0, backoff); backoff = Math.min(1, backoff * 2); continue; }
    if (len > 0) send();
    parentPort.postMessage({ error: e.message, code: e.code || 'EIO' });
    break;
  }
  backoff = 0.02;
  if (Atomics.load(credits, 1) !== 0) break;
  if (n === 0) {
    if (len > 0) send();
    parentPort.postMessage({ eof: true });
    break;
  }
  len += n;
  if (len === chunkSize) send();
  else if (n < full && waitReadable !== null && waitReadable(fd, dryWaitMs)) continue;
  else if (n < full) {
    // The pipe ran dry: hand over what we have now (a source that waits for
    // our answer sends nothing more), but a small piece as a right-sized
    // copy, keeping the big buffer, so a writer of small pieces (QEMU writes
    // 32 KiB at a time) does not cost a fresh chunk-sized buffer per piece.
    if (len >= chunkSize / 4) send();
    else {
      Atomics.sub(credits, 0, len);
      const out = Buffer.allocUnsafeSlow(len);
      buf.copy(out, 0, 0, len);
      parentPort.postMessage({ ab: out.buffer, len }, [out.buffer]);
      len = 0;
    }
  }
}
`;

/** Makes a read(2) blocked on the pipe `fd` return (one byte through /proc/self/fd). Best effort. */
export function wakePipeReader(fd: number): void {
  let w: number | null = null;
  try {
    w = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    fs.writeSync(w, Buffer.alloc(1));
  } catch {
    // not a pipe, no /proc, a full pipe: nothing blocked to wake
  } finally {
    if (w !== null) fs.closeSync(w);
  }
}

/** Heap limits for helper threads that keep almost nothing in JS objects. */
export const WORKER_HEAP = { maxYoungGenerationSizeMb: 2, maxOldGenerationSizeMb: 16 };

export interface FdReaderOptions {
  /** Largest chunk handed out (default 512 KiB). */
  chunkSize?: number;
  /** Chunks the worker may read ahead of the consumer (default 4). */
  readAhead?: number;
  /** The pipe's buffer size (default 64 KiB): a read shorter than this means the writer has nothing more right now. */
  pipeSize?: number;
  /**
   * How long a pipe that ran dry in the middle of a chunk is given to say
   * more before the part-filled chunk goes out (default 1 ms; 0: at once).
   * Needs the native module's waitReadable; without it, at once.
   */
  dryWaitMs?: number;
}

/** A readable of an fd's bytes (stdin: fd 0), read by a worker thread. */
export class FdReader extends Readable {
  private readonly worker: Worker;
  private readonly recycled: MessagePort;
  private readonly chunkSize: number;
  private readonly credits: Int32Array;
  /** Credits at which a stalled worker is woken (half the read-ahead window). */
  private readonly wakeAt: number;
  private owed = 0;
  private done = false;
  /**
   * Resolves once the reader thread runs JavaScript: its start-up took
   * ~50 ms on the bench machine, time a source that is already sending
   * spends blocked on a full socket. A caller that decides when its source
   * starts (save over QMP) waits for this first. Never rejects: a thread
   * that fails to start destroys the reader instead.
   */
  readonly started: Promise<void>;

  constructor(readonly fd: number, opts: FdReaderOptions = {}) {
    const chunkSize = opts.chunkSize ?? 512 << 10;
    super({ highWaterMark: chunkSize * 2 });
    this.chunkSize = chunkSize;
    const channel = new MessageChannel();
    this.recycled = channel.port1;
    // [0]: bytes the worker may still send; [1]: non-zero once destroyed.
    this.credits = new Int32Array(new SharedArrayBuffer(8));
    const window = (opts.readAhead ?? 4) * chunkSize;
    this.credits[0] = window;
    this.wakeAt = Math.max(1, window >> 1);
    // stdout/stderr: true, or the parent pipes the worker's into
    // process.stdout, whose creation makes fd 1 non-blocking.
    this.worker = new Worker(READER_SRC, {
      eval: true,
      stdout: true,
      stderr: true,
      workerData: {
        fd,
        chunkSize,
        credits: this.credits,
        pipeSize: opts.pipeSize ?? 65536,
        recycled: channel.port2,
        nativeFile: native()?.waitReadable ? nativeModuleFile() : null,
        dryWaitMs: opts.dryWaitMs ?? 1,
      },
      transferList: [channel.port2],
      // It holds no JS data to speak of: a small heap keeps peak RSS down.
      resourceLimits: WORKER_HEAP,
    });
    this.started = new Promise<void>((resolve) => {
      this.worker.once('online', () => resolve());
      this.worker.once('exit', () => resolve());
    });
    // A worker blocked in read() must not keep the process alive.
    this.worker.unref();
    this.worker.on('message', this.onMessage);
    this.worker.on('error', (err: Error) => this.destroy(new FdStreamError(fd, 'EIO', `reader thread: ${err.message}`)));
  }

  /**
   * Gives a chunk this reader pushed back for reuse. The caller vouches that
   * nothing refers to its bytes any more: its memory moves to the reader
   * thread (every view of it in this thread becomes empty). Small chunks
   * (a pipe that ran dry) are not reused. Returns whether it was taken.
   */
  recycle(chunk: Buffer): boolean {
    const ab = chunk.buffer;
    if (this.done || ab instanceof SharedArrayBuffer || ab.byteLength !== this.chunkSize || chunk.byteOffset !== 0) return false;
    this.recycled.postMessage(ab, [ab]);
    return true;
  }

  override _read(cb: (err: Error | null) => void): void {
    if (this.owed > 0) {
      this.grant(this.owed);
      this.owed = 0;
    }
    cb(null);
  }

  override _destroy(cb: (err: Error | null) => void): void {
    const wasReading = !this.done;
    this.done = true;
    this.recycled.close();
    Atomics.store(this.credits, 1, 1);
    Atomics.notify(this.credits, 0);
    // A thread blocked in read() is not ended by terminate(), and Node's
    // exit joins it: it would hold the process until the writer sends or
    // closes (an idle source under SIGTERM: forever). Wake it with a byte of
    // our own, written through a second opening of the same pipe; a full
    // pipe (EAGAIN) has no blocked reader to wake.
    if (wasReading) wakePipeReader(this.fd);
    void this.worker.terminate().catch(() => undefined);
    cb(null);
  }

  /**
   * The worker sleeps only when it has no credit left. Waking it takes a
   * cross-CPU interrupt, which on a VM cost ~80 us a time (17% of the main
   * thread when done per chunk): wake it once half the window is free again,
   * so one wake-up buys several chunks.
   */
  private grant(n: number): void {
    const before = Atomics.add(this.credits, 0, n);
    if (before < this.wakeAt && before + n >= this.wakeAt) Atomics.notify(this.credits, 0);
  }

  private readonly onMessage = (m: { ab?: ArrayBuffer; len?: number; eof?: boolean; error?: string; code?: string }): void => {
    if (this.done) return;
    if (m.ab) {
      const len = m.len ?? 0;
      if (this.push(Buffer.from(m.ab, 0, len))) this.grant(len);
      else this.owed += len;
    } else if (m.eof) {
      this.done = true;
      this.push(null);
    } else if (m.error !== undefined) {
      this.done = true;
      this.destroy(new FdStreamError(this.fd, m.code ?? 'EIO', `read: ${m.error}`));
    }
  };
}
