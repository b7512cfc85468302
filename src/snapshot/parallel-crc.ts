// CRC-32 of chunks fed in pieces, computed by a worker thread that reads the
// producer's own buffers: the producer fills slots of a ring in one
// SharedArrayBuffer and queues jobs (a slot and its pieces) in shared
// memory. Nothing is posted or copied per job: on our 2-vCPU VMs a
// postMessage costs a wake-up (50-100 µs) and a transferred buffer costs
// fresh pages and the worker's GC, which ate what the second CPU saved.
//
// Shared state (single producer, single consumer):
//   ctl:    HEAD (jobs queued), DONE (jobs finished), flags, CLOSED count
//   jobs:   ring of (slot or -1, first piece, piece count)
//   pieces: ring of (chunk, start, end, zeros, final), offsets in the slot
//   crcs:   one CRC per chunk, written when the chunk closes; closed: bitmap
//           (sent once, in the one message of a ring, when the chunk count
//           comes after the worker was started: see setChunks)
// The worker stores DONE after a job's results, so DONE >= n means job n-1's
// CRCs are visible and its slot may be filled again. Either side sleeps in
// Atomics.wait only after raising its flag, and the other side notifies only
// when it sees that flag: a worker that keeps up is never woken per job.
import * as os from 'node:os';
import * as path from 'node:path';
import { MessageChannel, MessagePort, receiveMessageOnPort, Worker } from 'node:worker_threads';
import { QemuSnapError } from '../errors';
import { WORKER_HEAP } from '../util/fd-reader';

export class ParallelCrcError extends QemuSnapError {}

/** Indices into the control array (shared with the worker). */
export const enum Ctl {
  Head = 0,
  Done = 1,
  WorkerSleeping = 2,
  ProducerWaiting = 3,
  Stop = 4,
  Failed = 5,
  Closed = 6,
  Size = 8,
}

/** The CRC table and its closed bitmap. */
export interface ParallelCrcTable {
  crcs: Uint32Array;
  closed: Int32Array;
}

/** What the worker gets in workerData. */
export interface ParallelCrcShared {
  ctl: Int32Array;
  jobs: Int32Array;
  pieces: Float64Array;
  data: Uint8Array;
  slotSize: number;
  /** Null until setChunks() sends it (on `port`). */
  table: ParallelCrcTable | null;
  port: MessagePort;
}

/** The table on the worker side: from workerData, or the one message setChunks() sends before the first job. */
export function receiveTable(shared: ParallelCrcShared): ParallelCrcTable {
  if (shared.table) return shared.table;
  const cell = new Int32Array(new SharedArrayBuffer(4));
  for (let i = 0; ; i++) {
    const m = receiveMessageOnPort(shared.port);
    if (m) return m.message as ParallelCrcTable;
    // Posted before the first job was published; a sleep only in case it is not delivered yet.
    if (i > 0) Atomics.wait(cell, 0, 0, 1);
  }
}

export interface ParallelCrcOptions {
  /**
   * Chunks the CRCs are of (numbered 0 .. chunks - 1); when not known yet,
   * call setChunks() before the first submit (the worker starts meanwhile).
   */
  chunks?: number;
  /** Ring slots (default 12). */
  slots?: number;
  /** Bytes per slot (default 1 MiB). */
  slotSize?: number;
  /**
   * A sleeping worker is woken once this many jobs wait (default half the
   * ring), or when the producer has to wait for it: one wake-up per batch,
   * not per job.
   */
  wakeBatch?: number;
  /** Job records in the queue (default 64; a power of two). */
  jobCapacity?: number;
  /** Pieces in the queue (default 4096). */
  pieceCapacity?: number;
  /** Waiting longer than this for a worker that does nothing is an error (default 30 s). */
  stallMs?: number;
}

/** True when a CRC thread can run beside the caller: with one CPU it would only take turns with it. */
export function parallelCrcUseful(): boolean {
  return (typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length) >= 2;
}

/**
 * CRC-32 of chunks on a worker thread, over a ring of shared slots.
 *
 *   const buf = crc.acquireSlot();        // blocks while the worker reads it
 *   fill buf; use it (read-only) while the worker hashes it
 *   crc.submit(buf.subarray(0, n), [chunk, start, end, zeros, final, ...]);
 *   crc.takeClosed((chunk, crc) => ...);  // chunks closed by finished jobs
 *   crc.flush();                          // waits for every job
 *
 * Slots go round in order, so a slot's bytes stay untouched by the producer
 * until the jobs that used it are done, while the producer fills the others.
 */
export class ParallelCrc {
  readonly slotSize: number;
  readonly slots: number;
  private readonly worker: Worker;
  private readonly ctl: Int32Array;
  private readonly jobs: Int32Array;
  private readonly pieceRing: Float64Array;
  private readonly data: SharedArrayBuffer;
  private crcs: Uint32Array = new Uint32Array(0);
  private closedBits: Int32Array = new Int32Array(0);
  private readonly port: MessagePort;
  private readonly slotBufs: Buffer[];
  /** Per slot: jobs that must be done before it is filled again (DONE >= this). */
  private readonly slotFreeAt: Float64Array;
  private readonly jobCap: number;
  private readonly pieceCap: number;
  private readonly wakeBatch: number;
  private readonly stallMs: number;
  private chunks = -1;
  private nextSlot = 0;
  private head = 0;
  private pieceHead = 0;
  /** (job number, chunk) of each final piece submitted, in order; [closedAt, length) not yet reported. */
  private finals: number[] = [];
  private finalsAt = 0;
  private failure: Error | null = null;
  private closed = false;

  constructor(opts: ParallelCrcOptions) {
    this.slots = opts.slots ?? 12;
    this.slotSize = opts.slotSize ?? 1 << 20;
    this.jobCap = opts.jobCapacity ?? 64;
    this.pieceCap = opts.pieceCapacity ?? 4096;
    this.wakeBatch = Math.max(1, opts.wakeBatch ?? Math.floor(this.slots / 2));
    this.stallMs = opts.stallMs ?? 30_000;
    if (this.slots < 2 || this.slotSize < 1 || (this.jobCap & (this.jobCap - 1)) !== 0 || this.jobCap < 2 || this.pieceCap < 2) {
      throw new ParallelCrcError(`CRC worker: bad ring (${this.slots} slots of ${this.slotSize} bytes, ${this.jobCap} jobs, ${this.pieceCap} pieces)`);
    }
    this.ctl = new Int32Array(new SharedArrayBuffer(4 * Ctl.Size));
    this.jobs = new Int32Array(new SharedArrayBuffer(4 * 3 * this.jobCap));
    this.pieceRing = new Float64Array(new SharedArrayBuffer(8 * 5 * this.pieceCap));
    this.data = new SharedArrayBuffer(this.slots * this.slotSize);
    const table = opts.chunks === undefined ? null : this.makeTable(opts.chunks);
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    this.slotBufs = Array.from({ length: this.slots }, (_, i) => Buffer.from(this.data, i * this.slotSize, this.slotSize));
    this.slotFreeAt = new Float64Array(this.slots);
    const shared: ParallelCrcShared = {
      ctl: this.ctl,
      jobs: this.jobs,
      pieces: this.pieceRing,
      data: new Uint8Array(this.data),
      slotSize: this.slotSize,
      table,
      port: port2,
    };
    // stdout/stderr: true keeps Node from creating process.stdout for the
    // worker's output, which would make fd 1 non-blocking (load writes it
    // synchronously); the worker prints nothing, stderr is forwarded.
    this.worker = new Worker(path.join(__dirname, 'parallel-crc-worker.js'), {
      workerData: shared,
      transferList: [port2],
      resourceLimits: WORKER_HEAP,
      stdout: true,
      stderr: true,
    });
    this.worker.stderr.on('data', (d: Buffer) => process.stderr.write(d));
    this.worker.on('error', (err: Error) => {
      this.failure ??= new ParallelCrcError(`CRC worker failed: ${err.message}`);
    });
    this.worker.unref();
  }

  /** Sizes the CRC table, once, when the constructor was not told the chunk count: before the first submit. */
  setChunks(chunks: number): void {
    if (this.chunks >= 0) throw new ParallelCrcError(`CRC worker: the chunk count is already ${this.chunks}`);
    this.port.postMessage(this.makeTable(chunks));
    this.port.close();
  }

  /**
   * The next slot of the ring (slotSize bytes), once the worker is done with
   * every job that used it: blocks the thread until then. The caller owns
   * the bytes until it submits them; slots not submitted come round again.
   */
  acquireSlot(): Buffer {
    const s = this.nextSlot;
    this.nextSlot = (s + 1) % this.slots;
    this.waitDone(this.slotFreeAt[s]);
    return this.slotBufs[s];
  }

  /**
   * Queues `items` (groups of five: chunk, start, end, zeros, final) over
   * `data`: each adds bytes [start, end) of data (none when equal), then
   * `zeros` zero bytes, to its chunk; final (1) closes the chunk. Pieces of
   * a chunk must come in order. `data` is an acquired slot or part of one
   * (no copy), any other buffer (copied into a slot), or null for pieces
   * with zeros only. The slot must not be written until acquired again.
   */
  submit(data: Uint8Array | null, items: ArrayLike<number>): void {
    this.check();
    if (items.length % 5 !== 0) throw new ParallelCrcError(`CRC worker: ${items.length} piece numbers are not groups of five`);
    if (items.length === 0) return;
    if (this.chunks < 0) throw new ParallelCrcError('CRC worker: pieces before the chunk count (setChunks)');
    for (let i = 0; i < items.length; i += 5) {
      const c = items[i];
      if (!Number.isInteger(c) || c < 0 || c >= this.chunks) throw new ParallelCrcError(`CRC worker: chunk ${c} is outside 0..${this.chunks - 1}`);
    }
    let slot = -1;
    let base = 0;
    if (data) {
      let lo = Infinity;
      let hi = 0;
      for (let i = 0; i < items.length; i += 5) {
        const start = items[i + 1];
        const end = items[i + 2];
        if (end > start) {
          if (start < 0 || end > data.length) throw new ParallelCrcError(`CRC worker: piece [${start}, ${end}) is outside its ${data.length}-byte buffer`);
          lo = Math.min(lo, start);
          hi = Math.max(hi, end);
        }
      }
      if (hi > lo) {
        if (data.buffer === this.data) {
          slot = Math.floor(data.byteOffset / this.slotSize);
          base = data.byteOffset - slot * this.slotSize;
          if (base + hi > this.slotSize) throw new ParallelCrcError('CRC worker: a buffer spans two slots');
        } else {
          if (hi - lo > this.slotSize) throw new ParallelCrcError(`CRC worker: ${hi - lo} bytes do not fit a ${this.slotSize}-byte slot`);
          const into = this.acquireSlot();
          into.set(data.subarray(lo, hi), 0);
          slot = (this.nextSlot + this.slots - 1) % this.slots;
          base = -lo;
        }
      }
    }
    // A job takes at most half the piece ring, so one always fits once the worker catches up.
    const most = 5 * Math.floor(this.pieceCap / 2);
    for (let from = 0; from < items.length; from += most) this.queue(slot, base, items, from, Math.min(items.length, from + most));
    if (slot >= 0) this.slotFreeAt[slot] = this.head;
    const ctl = this.ctl;
    if (Atomics.load(ctl, Ctl.WorkerSleeping) !== 0 && this.head - Atomics.load(ctl, Ctl.Done) >= this.wakeBatch) Atomics.notify(ctl, Ctl.Head);
  }

  /** Reports (chunk, CRC) of each chunk closed by a job that is done, in submission order. */
  takeClosed(onCrc: (chunk: number, crc: number) => void): void {
    const f = this.finals;
    if (this.finalsAt >= f.length) return;
    const done = Atomics.load(this.ctl, Ctl.Done);
    this.check();
    let i = this.finalsAt;
    for (; i < f.length && f[i] < done; i += 2) {
      this.finalsAt = i + 2;
      onCrc(f[i + 1], this.crcs[f[i + 1]]);
    }
    this.finalsAt = i;
    if (this.finalsAt === f.length) {
      f.length = 0;
      this.finalsAt = 0;
    } else if (this.finalsAt > 4096) {
      this.finals = f.slice(this.finalsAt);
      this.finalsAt = 0;
    }
  }

  /** The CRC of `chunk` once a finished job closed it, else undefined. */
  crcOf(chunk: number): number | undefined {
    if (!(chunk >= 0 && chunk < this.chunks)) return undefined;
    return (Atomics.load(this.closedBits, chunk >>> 5) & (1 << (chunk & 31))) !== 0 ? this.crcs[chunk] : undefined;
  }

  /** Chunks closed so far by finished jobs. */
  get closedCount(): number {
    return Atomics.load(this.ctl, Ctl.Closed);
  }

  /** Jobs queued so far, and jobs the worker has finished. */
  get jobsQueued(): number {
    return this.head;
  }

  get jobsDone(): number {
    return Atomics.load(this.ctl, Ctl.Done);
  }

  /** Blocks until every job submitted is done. */
  flush(): void {
    this.waitDone(this.head);
  }

  /** Stops the worker (jobs still queued are dropped). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    Atomics.store(this.ctl, Ctl.Stop, 1);
    Atomics.notify(this.ctl, Ctl.Head);
    this.port.close();
    await this.worker.terminate();
  }

  private makeTable(chunks: number): ParallelCrcTable {
    if (!Number.isSafeInteger(chunks) || chunks < 0 || chunks > 2 ** 31) throw new ParallelCrcError(`CRC worker: bad chunk count ${chunks}`);
    this.chunks = chunks;
    this.crcs = new Uint32Array(new SharedArrayBuffer(4 * Math.max(1, chunks)));
    this.closedBits = new Int32Array(new SharedArrayBuffer(4 * Math.max(1, Math.ceil(chunks / 32))));
    return { crcs: this.crcs, closed: this.closedBits };
  }

  private queue(slot: number, base: number, items: ArrayLike<number>, from: number, to: number): void {
    const n = (to - from) / 5;
    const ctl = this.ctl;
    // A free job record, and room for n pieces (pieces of jobs not done start at the oldest such job's first piece).
    this.waitDone(this.head - this.jobCap + 1);
    for (;;) {
      const done = Atomics.load(ctl, Ctl.Done);
      const firstUsed = done === this.head ? this.pieceHead : this.jobs[3 * (done & (this.jobCap - 1)) + 1];
      const used = (this.pieceHead - firstUsed + this.pieceCap) % this.pieceCap;
      if (done === this.head || used + n <= this.pieceCap - 1) break;
      this.waitDone(done + 1);
    }
    const ring = this.pieceRing;
    let p = this.pieceHead;
    for (let i = from; i < to; i += 5) {
      const at = 5 * p;
      const final = items[i + 4] !== 0;
      ring[at] = items[i];
      ring[at + 1] = items[i + 2] > items[i + 1] ? items[i + 1] + base : 0;
      ring[at + 2] = items[i + 2] > items[i + 1] ? items[i + 2] + base : 0;
      ring[at + 3] = items[i + 3];
      ring[at + 4] = final ? 1 : 0;
      if (final) this.finals.push(this.head, items[i]);
      p = (p + 1) % this.pieceCap;
    }
    const j = 3 * (this.head & (this.jobCap - 1));
    this.jobs[j] = slot;
    this.jobs[j + 1] = this.pieceHead;
    this.jobs[j + 2] = n;
    this.pieceHead = p;
    this.head++;
    // Publishes the job: the worker reads it after it sees the new HEAD.
    Atomics.store(ctl, Ctl.Head, this.head);
  }

  /** Blocks until the worker has finished `jobs` jobs. */
  private waitDone(jobs: number): void {
    const ctl = this.ctl;
    let done = Atomics.load(ctl, Ctl.Done);
    if (done >= jobs) return;
    this.check();
    // The worker may sleep on fewer jobs than a wake batch: it must run now.
    if (Atomics.load(ctl, Ctl.WorkerSleeping) !== 0) Atomics.notify(ctl, Ctl.Head);
    Atomics.store(ctl, Ctl.ProducerWaiting, 1);
    let last = done;
    let since = Date.now();
    try {
      while ((done = Atomics.load(ctl, Ctl.Done)) < jobs) {
        if (Atomics.load(ctl, Ctl.Failed) !== 0) throw new ParallelCrcError('CRC worker failed');
        if (done !== last) {
          last = done;
          since = Date.now();
        } else if (Date.now() - since > this.stallMs) {
          throw new ParallelCrcError(`CRC worker made no progress for ${Math.round(this.stallMs / 1000)} s`);
        }
        Atomics.wait(ctl, Ctl.Done, done, 100);
      }
    } finally {
      Atomics.store(ctl, Ctl.ProducerWaiting, 0);
    }
  }

  private check(): void {
    if (this.closed) throw new ParallelCrcError('CRC worker: used after close');
    if (this.failure) throw this.failure;
    if (Atomics.load(this.ctl, Ctl.Failed) !== 0) throw new ParallelCrcError('CRC worker failed');
  }
}
