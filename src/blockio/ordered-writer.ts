import { Writable, WritableEvents } from 'streamx';
import { InvalidBlockWriteError, wrapWriteError } from './errors';

/** Where an OrderedBlockWriter puts its data (a file, a QCOW2 image...). */
export interface BlockWriteTarget {
  writev(offset: number, buffers: Buffer[]): Promise<void>;
  /**
   * Writes a segment write (one with `segments`) now, on the calling
   * thread, and returns true; or returns false, having done nothing, and
   * the ring issues writev() with its pieces instead. For data already in
   * memory whose write costs less than the two thread hand-overs of an
   * asynchronous one (a pwritev of page-cache pages).
   */
  writeSync?(w: BlockWrite): boolean;
}

/**
 * One contiguous range: the buffers' lengths add up to `length`; or, with
 * `segments`, the range is the `count` pieces (index into `buffers`,
 * offset, length) that `segments` lists, in order, and `buffers` are where
 * they lie (at most 16; the buffers must not change until the write completes).
 */
export interface BlockWrite {
  offset: number;
  length: number;
  buffers: Buffer[];
  segments?: Float64Array;
  count?: number;
}

/** The pieces of a segment write as buffers, in order (views, no copy). */
export function segmentPieces(w: BlockWrite): Buffer[] {
  if (w.segments === undefined) return w.buffers;
  const out: Buffer[] = [];
  const s = w.segments;
  for (let i = 0; i < (w.count ?? 0); i++) {
    const k = i * 3;
    const b = w.buffers[s[k]];
    const start = s[k + 1];
    const len = s[k + 2];
    const last = out[out.length - 1];
    // Adjacent pieces of one buffer become one view.
    if (last !== undefined && last.buffer === b.buffer && last.byteOffset + last.length === b.byteOffset + start) {
      out[out.length - 1] = Buffer.from(b.buffer, last.byteOffset, last.length + len);
    } else out.push(b.subarray(start, start + len));
  }
  return out;
}

export interface OrderedBlockWriterOptions {
  /** Most target.writev calls outstanding at once (and most writes accepted but not completed). Default 8. */
  maxInFlight?: number;
  /** Bytes the writable queues before it reports backpressure. Default 2 MiB. */
  highWaterMark?: number;
  /**
   * Most writes accepted but not yet reported (completed ones wait here for
   * slower earlier ones). Default 2 × maxInFlight. Bounds memory when one
   * write is much slower than the ones after it.
   */
  ringSize?: number;
  /** Called for every completed write, strictly in submission order. */
  onComplete?: (w: BlockWrite, seq: number) => void;
}

export interface OrderedBlockWriterEvents extends WritableEvents {
  /** Same as onComplete: strictly in submission order. */
  progress: [w: BlockWrite, seq: number];
}

type Callback = (err: Error | null) => void;

const WAITING = 0;
const ISSUED = 1;
const DONE = 2;

class WriteSlot {
  state = WAITING;
  readonly end: number;
  constructor(readonly w: BlockWrite, readonly seq: number) {
    this.end = w.offset + w.length;
  }
  overlaps(other: WriteSlot): boolean {
    return this.w.offset < other.end && other.w.offset < this.end;
  }
}

export const DEFAULT_MAX_IN_FLIGHT = 8;
export const DEFAULT_HIGH_WATER_MARK = 2 * 1024 * 1024;

function positiveInt(v: number | undefined, fallback: number, what: string): number {
  if (v === undefined) return fallback;
  if (!Number.isSafeInteger(v) || v < 1) throw new RangeError(`${what} must be a positive integer, got ${v}`);
  return v;
}

/**
 * The save side of the buffer ring: a Writable of BlockWrites that keeps up
 * to maxInFlight target writes outstanding and reports their completion in
 * submission order. A write overlapping one that is still outstanding is
 * held back until that one finishes, so a page re-sent by a live VM lands
 * after its older copy.
 */
export class OrderedBlockWriter extends Writable<OrderedBlockWriterEvents> {
  private readonly target: BlockWriteTarget;
  private readonly maxInFlight: number;
  private readonly ringSize: number;
  private readonly onComplete: ((w: BlockWrite, seq: number) => void) | undefined;
  /** Accepted and not yet reported, in submission order. */
  private readonly ring: WriteSlot[] = [];
  /** Accepted and not yet completed (waiting or issued), in submission order; at most maxInFlight. */
  private readonly active: WriteSlot[] = [];
  private issued = 0;
  private nextSeq = 0;
  private written = 0;
  private heldWriteCb: Callback | null = null;
  private finalCb: Callback | null = null;
  private settled: (() => void) | null = null;

  constructor(target: BlockWriteTarget, opts: OrderedBlockWriterOptions = {}) {
    const maxInFlight = positiveInt(opts.maxInFlight, DEFAULT_MAX_IN_FLIGHT, 'maxInFlight');
    super({
      highWaterMark: positiveInt(opts.highWaterMark, DEFAULT_HIGH_WATER_MARK, 'highWaterMark'),
      // streamx loses track of queued items whose byte length is 0.
      byteLength: (w) => {
        const len = (w as BlockWrite).length;
        return len > 0 ? len : 1;
      },
    });
    this.target = target;
    this.maxInFlight = maxInFlight;
    this.ringSize = Math.max(maxInFlight, positiveInt(opts.ringSize, 2 * maxInFlight, 'ringSize'));
    this.onComplete = opts.onComplete;
  }

  /** target.writev calls currently outstanding. */
  get inFlight(): number {
    return this.issued;
  }

  /** Bytes of writes completed and reported (a prefix of the submitted writes). */
  get bytesWritten(): number {
    return this.written;
  }

  /** Writes reported complete so far; the next one to report has this seq. */
  get completed(): number {
    return this.nextSeq - this.ring.length;
  }

  /** Typed front of streamx's write(): false means wait for 'drain'. */
  override write(w: BlockWrite): boolean {
    return super.write(w);
  }

  /** Typed front of streamx's end(); the data argument is optional at runtime. */
  override end(w?: BlockWrite): this {
    return super.end(w);
  }

  override _write(w: BlockWrite, cb: Callback): void {
    const seq = this.nextSeq;
    const bad = validate(w, seq);
    if (bad !== null) return cb(bad);
    this.nextSeq++;
    const slot = new WriteSlot(w, seq);
    this.ring.push(slot);
    const mustWait = this.overlapsEarlier(slot, this.active.length);
    this.active.push(slot);
    if (!mustWait) this.issue(slot);
    if (this.hasFreeSlot()) cb(null);
    else this.heldWriteCb = cb;
  }

  override _final(cb: Callback): void {
    if (this.ring.length === 0) cb(null);
    else this.finalCb = cb;
  }

  override _predestroy(): void {
    // streamx runs _destroy only once no _write/_final callback is pending;
    // hand back the ones we hold (after destroy() returns, not inside it).
    queueMicrotask(() => this.releaseCallbacks(null));
  }

  override _destroy(cb: Callback): void {
    // Waiting writes are dropped; issued ones are awaited so that the owner
    // may close the target once 'close' has fired.
    if (this.issued === 0) return cb(null);
    this.settled = () => cb(null);
  }

  private hasFreeSlot(): boolean {
    return this.active.length < this.maxInFlight && this.ring.length < this.ringSize;
  }

  /** Does `slot` intersect any of active[0 .. upto)? At most maxInFlight entries. */
  private overlapsEarlier(slot: WriteSlot, upto: number): boolean {
    for (let i = 0; i < upto; i++) {
      if (this.active[i].overlaps(slot)) return true;
    }
    return false;
  }

  private issue(slot: WriteSlot): void {
    slot.state = ISSUED;
    this.issued++;
    const w = slot.w;
    if (w.segments !== undefined && this.target.writeSync !== undefined) {
      let now: boolean;
      try {
        now = this.target.writeSync(w);
      } catch (err) {
        return this.onWriteFailed(slot, err);
      }
      if (now) return this.onWriteDone(slot);
    }
    let p: Promise<void>;
    try {
      p = this.target.writev(w.offset, segmentPieces(w));
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      () => this.onWriteDone(slot),
      (err: unknown) => this.onWriteFailed(slot, err),
    );
  }

  private onWriteDone(slot: WriteSlot): void {
    this.issued--;
    slot.state = DONE;
    this.active.splice(this.active.indexOf(slot), 1);
    if (this.destroying) return this.checkSettled();

    // Writes that were waiting on this one (or on each other) may go now.
    // (A copy: a synchronous write completes, and leaves active, inside issue().)
    if (this.active.length > 0) {
      for (const s of this.active.slice()) {
        if (s.state === WAITING && !this.overlapsEarlier(s, this.active.indexOf(s))) this.issue(s);
      }
    }

    try {
      while (this.ring.length > 0 && this.ring[0].state === DONE) {
        const done = this.ring.shift() as WriteSlot;
        this.written += done.w.length;
        if (this.onComplete !== undefined) this.onComplete(done.w, done.seq);
        this.emit('progress', done.w, done.seq);
      }
    } catch (err) {
      // A throwing listener must not become an unhandled rejection.
      this.destroy(err instanceof Error ? err : new Error(String(err)));
      return;
    }

    if (this.heldWriteCb !== null && this.hasFreeSlot()) {
      const cb = this.heldWriteCb;
      this.heldWriteCb = null;
      cb(null);
    }
    if (this.finalCb !== null && this.ring.length === 0) {
      const cb = this.finalCb;
      this.finalCb = null;
      cb(null);
    }
  }

  private onWriteFailed(slot: WriteSlot, err: unknown): void {
    this.issued--;
    slot.state = DONE;
    if (!this.destroying) {
      const e = wrapWriteError(err, slot.w.offset, slot.w.length, slot.seq);
      this.destroy(e);
    }
    this.checkSettled();
  }

  private releaseCallbacks(err: Error | null): void {
    const w = this.heldWriteCb;
    const f = this.finalCb;
    this.heldWriteCb = null;
    this.finalCb = null;
    if (w !== null) w(err);
    if (f !== null) f(err);
  }

  private checkSettled(): void {
    if (this.issued === 0 && this.settled !== null) {
      const s = this.settled;
      this.settled = null;
      s();
    }
  }
}

function validate(w: BlockWrite, seq: number): InvalidBlockWriteError | null {
  if (!Number.isSafeInteger(w.offset) || w.offset < 0) {
    return new InvalidBlockWriteError(w.offset, w.length, seq, 'offset is not a non-negative integer');
  }
  let sum = 0;
  if (w.segments !== undefined) {
    const s = w.segments;
    const count = w.count ?? 0;
    if (!Number.isSafeInteger(count) || count < 0 || count * 3 > s.length) {
      return new InvalidBlockWriteError(w.offset, w.length, seq, `segment count ${count} does not fit its ${s.length / 3} triples`);
    }
    for (let i = 0; i < count; i++) {
      const b = w.buffers[s[i * 3]];
      if (b === undefined || s[i * 3 + 1] < 0 || s[i * 3 + 2] < 0 || s[i * 3 + 1] + s[i * 3 + 2] > b.length) {
        return new InvalidBlockWriteError(w.offset, w.length, seq, `segment ${i} lies outside its buffer`);
      }
      sum += s[i * 3 + 2];
    }
  } else for (let i = 0; i < w.buffers.length; i++) sum += w.buffers[i].length;
  if (sum !== w.length) {
    return new InvalidBlockWriteError(w.offset, w.length, seq, `buffers hold ${sum} bytes`);
  }
  return null;
}
