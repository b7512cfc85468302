// Precopy load to a file descriptor without streams in between: the plan is
// read in order with pread(2) on the main thread into one reused buffer and
// each read goes straight to the encoder, which writes the pipe
// synchronously. Against OrderedBlockReader's asynchronous reads this saves
// two thread hand-overs per read (expensive on few CPUs), a fresh buffer per
// read (page faults) and the stream machinery; with the data in the page
// cache a pread costs less than the hand-overs it replaces. Where the source
// can map the range (Qcow2Image.viewSync), the encoder gets the file's pages
// themselves and not even the pread's copy is made.
import type { BlockRead, ReadPlanEntry } from '../blockio';
import { InvalidBlockReadError } from '../blockio';
import { wrapReadError } from '../blockio/errors';

/** Where the pump reads: Qcow2Image has all of it. */
export interface SyncReadSource {
  /** Reads now, or returns false when only the asynchronous path can (see Qcow2Image.readIntoSync). */
  readIntoSync(offset: number, length: number, out: Buffer, outOffset?: number): boolean;
  readInto(offset: number, length: number, out: Buffer, outOffset?: number): Promise<void>;
  /** The range's bytes in place (mapped), or null: then it is read (see Qcow2Image.viewSync). */
  viewSync?(offset: number, length: number): Buffer | null;
}

export interface DirectPumpOptions {
  /** Largest data entry in the plan: the size of the reused read buffer. */
  readSize: number;
  /**
   * Bytes of work between turns of the event loop (timers for progress,
   * signals, an abort). Default 8 MiB: a few milliseconds.
   */
  yieldEvery?: number;
  /** What a hole weighs against yieldEvery per byte of it (its ZERO records are ~1/450 of its size). */
  holeWeight?: number;
  /**
   * Called after each encode: a promise when the sink kept output aside
   * (a full pipe, FdWriter.flushPending), which the pump awaits before it
   * reads on, so that an interrupt is seen while the reader stalls.
   */
  drain?: () => Promise<void> | null;
}

function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class DirectLoadPump {
  private error: Error | null = null;
  private buf: Buffer;
  private readonly yieldEvery: number;
  private readonly holeWeight: number;

  /**
   * @param encode takes each read in plan order and is done with its data
   *   when it returns (the buffer is filled again by the next read)
   */
  constructor(
    private readonly source: SyncReadSource,
    private readonly plan: Iterator<ReadPlanEntry>,
    private readonly encode: (read: BlockRead) => void,
    opts: DirectPumpOptions,
  ) {
    this.buf = Buffer.allocUnsafe(opts.readSize);
    this.yieldEvery = opts.yieldEvery ?? 8 << 20;
    this.holeWeight = opts.holeWeight ?? 1 / 64;
    this.drain = opts.drain ?? null;
  }

  private readonly drain: (() => Promise<void> | null) | null;

  /** Stops the pump at its next read: run() rejects with `err`. */
  abort(err: Error): void {
    this.error ??= err;
  }

  /** Reads and encodes the whole plan. */
  async run(): Promise<void> {
    // One BlockRead object for the whole run: the encoder does not keep it.
    const read: BlockRead = { offset: 0, length: 0, data: null, urgent: false };
    let work = 0;
    for (;;) {
      if (this.error) throw this.error;
      const next = this.plan.next();
      if (next.done === true) break;
      const e = next.value;
      if (!Number.isSafeInteger(e.offset) || e.offset < 0 || !Number.isSafeInteger(e.length) || e.length < 0) {
        throw new InvalidBlockReadError(e.offset, e.length, 'offset or length is not a non-negative integer');
      }
      read.offset = e.offset;
      read.length = e.length;
      read.tag = e.tag;
      if (e.hole) {
        read.data = null;
        work += e.length * this.holeWeight;
      } else {
        read.data = this.viewEntry(e) ?? (await this.readEntry(e));
        work += e.length;
      }
      this.encode(read);
      read.data = null;
      const drained = this.drain?.();
      if (drained) {
        work = 0;
        await drained;
      }
      if (work >= this.yieldEvery) {
        work = 0;
        await turn();
      }
    }
    if (this.error) throw this.error;
  }

  private viewEntry(e: ReadPlanEntry): Buffer | null {
    if (!this.source.viewSync) return null;
    try {
      return this.source.viewSync(e.offset, e.length);
    } catch (err) {
      throw wrapReadError(err, e.offset, e.length);
    }
  }

  private async readEntry(e: ReadPlanEntry): Promise<Buffer> {
    // A plan entry larger than readSize gets a larger buffer.
    if (this.buf.length < e.length) this.buf = Buffer.allocUnsafe(Math.max(e.length, this.buf.length));
    const out = e.length === this.buf.length ? this.buf : this.buf.subarray(0, e.length);
    try {
      if (!this.source.readIntoSync(e.offset, e.length, out, 0)) await this.source.readInto(e.offset, e.length, out, 0);
    } catch (err) {
      throw wrapReadError(err, e.offset, e.length);
    }
    return out;
  }
}
