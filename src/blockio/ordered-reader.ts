import { Readable } from 'streamx';
import { BlockReaderEndedError, BlockReadError, InvalidBlockReadError, wrapReadError } from './errors';
import { DEFAULT_HIGH_WATER_MARK, DEFAULT_MAX_IN_FLIGHT } from './ordered-writer';

/** Where an OrderedBlockReader gets its data. */
export interface BlockReadSource {
  read(offset: number, length: number): Promise<Buffer>;
}

/** One range to emit. A hole is never read: it is emitted with data = null. */
export interface ReadPlanEntry {
  offset: number;
  length: number;
  hole: boolean;
  tag?: number;
}

export interface BlockRead {
  offset: number;
  length: number;
  data: Buffer | null;
  urgent: boolean;
  tag?: number;
}

export interface OrderedBlockReaderOptions {
  /** Most background reads outstanding. Default 8. */
  maxInFlight?: number;
  /** Most urgent reads outstanding (a lane of its own). Default 4. */
  maxUrgentInFlight?: number;
  /** While urgent requests are pending, background reads in flight are capped at this. Default: no extra cap. */
  backgroundInFlightWhenUrgent?: number;
  /** Bytes the readable buffers before it stops issuing reads. Default 2 MiB. */
  highWaterMark?: number;
  /**
   * Most background entries issued but not yet emitted (finished ones wait
   * for slower earlier ones). Default 4 × maxInFlight.
   */
  ringSize?: number;
}

/** Byte weight of an emitted hole for backpressure: small but not zero. */
export const HOLE_WEIGHT = 64;
export const DEFAULT_MAX_URGENT_IN_FLIGHT = 4;

const PENDING = 0;
const READING = 1;
const DONE = 2;

class ReadSlot {
  state = PENDING;
  data: Buffer | null = null;
  constructor(readonly entry: ReadPlanEntry, readonly urgent: boolean) {}
}

function positiveInt(v: number | undefined, fallback: number, what: string): number {
  if (v === undefined) return fallback;
  if (!Number.isSafeInteger(v) || v < 1) throw new RangeError(`${what} must be a positive integer, got ${v}`);
  return v;
}

/**
 * The load side of the buffer ring: reads a (lazily consumed, possibly huge)
 * plan of ranges with up to maxInFlight reads outstanding and emits them in
 * plan order. An urgent lane serves demand-paging requests ahead of the
 * plan: they are read at once and emitted as soon as they are ready (in
 * their own order), ahead of background results not yet emitted.
 *
 * The stream ends when the plan is exhausted, everything is emitted, no
 * urgent request is pending and the owner does not hold it open.
 */
export class OrderedBlockReader extends Readable {
  private readonly source: BlockReadSource;
  private plan: Iterator<ReadPlanEntry> | null;
  private maxInFlight: number;
  private readonly maxUrgentInFlight: number;
  private readonly backgroundWhenUrgent: number;
  private readonly ringSize: number;
  /** Background entries taken from the plan and not yet emitted, plan order. */
  private readonly ring: ReadSlot[] = [];
  /** Urgent requests not yet emitted, submission order (issued ones first). */
  private readonly urgentQueue: ReadSlot[] = [];
  private backgroundReading = 0;
  private urgentReading = 0;
  private held = false;
  private ended = false;
  private servicing = false;
  private settled: (() => void) | null = null;

  constructor(source: BlockReadSource, plan: Iterable<ReadPlanEntry>, opts: OrderedBlockReaderOptions = {}) {
    super({
      highWaterMark: positiveInt(opts.highWaterMark, DEFAULT_HIGH_WATER_MARK, 'highWaterMark'),
      byteLength: (r) => {
        const data = (r as BlockRead).data;
        return data !== null && data.length > 0 ? data.length : HOLE_WEIGHT;
      },
    });
    this.source = source;
    this.plan = plan[Symbol.iterator]();
    this.maxInFlight = positiveInt(opts.maxInFlight, DEFAULT_MAX_IN_FLIGHT, 'maxInFlight');
    this.maxUrgentInFlight = positiveInt(opts.maxUrgentInFlight, DEFAULT_MAX_URGENT_IN_FLIGHT, 'maxUrgentInFlight');
    this.backgroundWhenUrgent = positiveInt(opts.backgroundInFlightWhenUrgent, Number.MAX_SAFE_INTEGER, 'backgroundInFlightWhenUrgent');
    this.ringSize = Math.max(this.maxInFlight, positiveInt(opts.ringSize, 4 * this.maxInFlight, 'ringSize'));
  }

  /** Reads outstanding, both lanes. */
  get inFlight(): number {
    return this.backgroundReading + this.urgentReading;
  }

  /** Background reads outstanding. */
  get backgroundInFlight(): number {
    return this.backgroundReading;
  }

  /** Urgent requests accepted and not yet emitted. */
  /** True once the stream has pushed its end: urgent() would throw. */
  get exhausted(): boolean {
    return this.ended;
  }

  get urgentPending(): number {
    return this.urgentQueue.length;
  }

  /**
   * Read `entry` ahead of the plan: issued before any background read not
   * yet issued, emitted before background results not yet emitted. The
   * same range may also come again from the plan; the owner decides what a
   * duplicate means.
   */
  urgent(entry: ReadPlanEntry): void {
    if (this.ended) throw new BlockReaderEndedError(entry.offset);
    // Torn down by an error elsewhere in the pipeline: nothing to serve.
    if (this.destroying) return;
    const bad = validate(entry);
    if (bad !== null) throw bad;
    const slot = new ReadSlot(entry, true);
    if (entry.hole) slot.state = DONE;
    this.urgentQueue.push(slot);
    this.service();
  }

  /** Change how many background reads may be outstanding (outstanding ones are not cancelled). */
  setMaxInFlight(n: number): void {
    this.maxInFlight = positiveInt(n, n, 'maxInFlight');
    this.service();
  }

  /** While held, the stream does not end even after the plan is exhausted (postcopy). */
  holdOpen(flag: boolean): void {
    this.held = flag;
    this.service();
  }

  /** Typed front of streamx's read(). */
  override read(): BlockRead | null {
    return super.read() as BlockRead | null;
  }

  override _read(cb: (err: Error | null) => void): void {
    this.service();
    cb(null);
  }

  override _predestroy(): void {
    const plan = this.plan;
    this.plan = null;
    if (plan !== null && typeof plan.return === 'function') {
      try {
        plan.return();
      } catch {
        // The plan is being abandoned; its cleanup error adds nothing.
      }
    }
  }

  override _destroy(cb: (err: Error | null) => void): void {
    // Outstanding reads are awaited so the owner may close the source on 'close'.
    if (this.inFlight === 0) return cb(null);
    this.settled = () => cb(null);
  }

  /** Issue what may be issued, emit what is ready, end if all is done. */
  private service(): void {
    // push() may re-enter through streamx callbacks; one pass at a time.
    if (this.servicing || this.destroying || this.ended) return;
    this.servicing = true;
    try {
      for (let i = 0; i < this.urgentQueue.length && this.urgentReading < this.maxUrgentInFlight; i++) {
        const s = this.urgentQueue[i];
        if (s.state === PENDING) this.issue(s);
      }
      this.flush();

      const limit = this.urgentQueue.length > 0 ? Math.min(this.maxInFlight, this.backgroundWhenUrgent) : this.maxInFlight;
      while (
        this.plan !== null &&
        this.backgroundReading < limit &&
        this.ring.length < this.ringSize &&
        !Readable.isBackpressured(this)
      ) {
        const next = this.plan.next();
        if (next.done === true) {
          this.plan = null;
          break;
        }
        const bad = validate(next.value);
        if (bad !== null) throw bad;
        const slot = new ReadSlot(next.value, false);
        this.ring.push(slot);
        if (next.value.hole) {
          slot.state = DONE;
          // Emit at once so a run of holes counts against the highWaterMark.
          this.flush();
        } else {
          this.issue(slot);
        }
      }

      if (this.plan === null && this.ring.length === 0 && this.urgentQueue.length === 0 && !this.held) {
        this.ended = true;
        this.push(null);
      }
    } catch (err) {
      // A plan iterator that throws, or an invalid entry.
      this.destroy(err instanceof Error ? err : new Error(String(err)));
    } finally {
      this.servicing = false;
    }
  }

  private flush(): void {
    const u = this.urgentQueue;
    while (u.length > 0 && u[0].state === DONE) this.emitSlot(u.shift() as ReadSlot);
    const r = this.ring;
    while (r.length > 0 && r[0].state === DONE) this.emitSlot(r.shift() as ReadSlot);
  }

  private emitSlot(s: ReadSlot): void {
    const e = s.entry;
    const out: BlockRead = { offset: e.offset, length: e.length, data: s.data, urgent: s.urgent };
    if (e.tag !== undefined) out.tag = e.tag;
    s.data = null;
    this.push(out);
  }

  private issue(s: ReadSlot): void {
    s.state = READING;
    if (s.urgent) this.urgentReading++;
    else this.backgroundReading++;
    let p: Promise<Buffer>;
    try {
      p = this.source.read(s.entry.offset, s.entry.length);
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      (buf) => this.onReadDone(s, buf),
      (err: unknown) => this.onReadFailed(s, err),
    );
  }

  private onReadDone(s: ReadSlot, buf: Buffer): void {
    this.settle(s);
    if (this.destroying) return this.checkSettled();
    if (!Buffer.isBuffer(buf) || buf.length !== s.entry.length) {
      const got = Buffer.isBuffer(buf) ? `${buf.length} bytes` : typeof buf;
      this.destroy(new BlockReadError(s.entry.offset, s.entry.length, new Error(`source returned ${got}`)));
      return;
    }
    s.data = buf;
    this.service();
  }

  private onReadFailed(s: ReadSlot, err: unknown): void {
    this.settle(s);
    if (!this.destroying) this.destroy(wrapReadError(err, s.entry.offset, s.entry.length));
    this.checkSettled();
  }

  private settle(s: ReadSlot): void {
    s.state = DONE;
    if (s.urgent) this.urgentReading--;
    else this.backgroundReading--;
  }

  private checkSettled(): void {
    if (this.inFlight === 0 && this.settled !== null) {
      const s = this.settled;
      this.settled = null;
      s();
    }
  }
}

function validate(e: ReadPlanEntry): InvalidBlockReadError | null {
  if (!Number.isSafeInteger(e.offset) || e.offset < 0) {
    return new InvalidBlockReadError(e.offset, e.length, 'offset is not a non-negative integer');
  }
  if (!Number.isSafeInteger(e.length) || e.length < 0) {
    return new InvalidBlockReadError(e.offset, e.length, 'length is not a non-negative integer');
  }
  return null;
}
