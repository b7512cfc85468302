// Block reads of a snapshot image → the RAM part of a migration stream.
//
// Joins the image side (disk offsets, holes) and the stream side (blocks,
// page addresses, records): every page of every block goes out exactly once,
// data pages as PAGE, all-zero pages and holes as ZERO, in PART sections of
// bounded size. Postcopy adds a switch point (after a share of the data
// pages) and prompt flushing of demand-paged ranges.
import { Transform } from 'streamx';
import type { BlockRead } from '../blockio';
import { RamRecordWriter, RamBlockName, SegmentSink, ramBlockName } from '../migration/ram-writer';
import { unsentRanges, DiscardRange } from '../migration/postcopy';
import type { RamBlockLayout } from './layout';
import { PageBits } from '../util/page-bits';

/** A section is closed after this many bytes so the destination makes progress. */
const SECTION_LIMIT = 8 << 20;

export interface LoadEncoderOptions {
  blocks: RamBlockLayout[];
  pageSize: number;
  ramSectionId: number;
  /** Bytes before the first page (the leader, and postcopy commands). */
  prefix: Buffer[];
  /** Awaited after the prefix went out, before the first page (postcopy: ADVISE accepted). */
  beforeFirstRange?: () => Promise<void>;
  /** Awaited before the suffix goes out (load: RAM verified against its digests). */
  beforeSuffix?: () => Promise<void>;
  /** Bytes after the last page (device state, or EOF in postcopy). */
  suffix: () => Buffer[];
  /**
   * Called before a range is encoded; returns bytes to emit first (postcopy
   * switch). The encoder closes its open section before emitting them.
   */
  interject?: () => Buffer[] | null;
  /** Flush output after every range (postcopy: requested pages must not wait in a chunk). */
  flushEachRange?: () => boolean;
  /** Called after a background range went into the output; the read's buffer is the callee's. */
  onBackgroundEncoded?: (read: BlockRead) => void;
  /** Called after an urgent range went into the output. */
  onUrgentSent?: (read: BlockRead) => void;
  /**
   * Writes each output chunk synchronously instead of pushing it (precopy to
   * a file descriptor): the encoder then reuses one output buffer, and the
   * readable side carries nothing.
   */
  sink?: (chunk: Buffer) => void;
  /**
   * With `sink`: pages go out by reference in gathered writes, flushed at
   * the end of every encode(), instead of being copied into the output
   * buffer (see RamRecordWriter).
   */
  gather?: SegmentSink;
  /** With `sink`: awaited after each read is encoded, before the next (a full pipe's leftovers). */
  drain?: () => Promise<void> | null;
}

interface BlockState {
  layout: RamBlockLayout;
  name: RamBlockName;
  /** One bit per page: set once the page went out. */
  sent: PageBits;
  pages: number;
}

export class LoadEncoder extends Transform {
  private readonly writer: RamRecordWriter;
  private readonly blocks: BlockState[];
  private readonly pageSize: number;
  private readonly zeroPage: Buffer;
  private started = false;
  private readonly gathering: boolean;
  dataPagesSent = 0;
  zeroPagesSent = 0;
  bytesOut = 0;

  constructor(private readonly opts: LoadEncoderOptions) {
    super({
      highWaterMark: 1 << 20,
      byteLengthWritable: (r: unknown) => (r as BlockRead).data?.length ?? 64,
      byteLengthReadable: (b: unknown) => (b as Buffer).length,
    });
    this.pageSize = opts.pageSize;
    this.zeroPage = Buffer.alloc(opts.pageSize);
    // A sink writes each chunk before the writer goes on, so the writer may
    // lend it its buffer; pushed chunks must be the consumer's to keep.
    const sink = opts.sink;
    const emit = sink ?? ((chunk: Buffer) => void this.push(chunk));
    const onChunk = (chunk: Buffer): void => {
      this.bytesOut += chunk.length;
      emit(chunk);
    };
    const gather = sink && opts.gather ? opts.gather : null;
    const onSegments: SegmentSink | null = gather
      ? (buffers, segments, count, bytes) => {
          this.bytesOut += bytes;
          gather(buffers, segments, count, bytes);
        }
      : null;
    this.writer = new RamRecordWriter(opts.ramSectionId, opts.pageSize, onChunk, 1 << 20, sink !== undefined, onSegments);
    this.gathering = gather !== null;
    this.blocks = opts.blocks.map((layout) => {
      const pages = Math.ceil(layout.length / opts.pageSize);
      return { layout, name: ramBlockName(layout.id), sent: new PageBits(pages), pages };
    });
  }

  /** Byte ranges of block `index` whose pages have not gone out (what a postcopy switch discards). */
  unsentRanges(index: number): DiscardRange[] {
    const st = this.blocks[index];
    return unsentRanges(st.sent, st.pages, this.pageSize);
  }

  isSent(index: number, page: number): boolean {
    const st = this.blocks[index];
    return st.sent.has(page);
  }

  override _transform(read: BlockRead, cb: (err: Error | null, out?: unknown) => void): void {
    if (!this.started) {
      const gate = this.begin();
      if (gate) {
        gate.then(
          () => this._transform(read, cb),
          (err: Error) => cb(err),
        );
        return;
      }
    }
    let wait: Promise<void> | null | undefined;
    try {
      this.encode(read);
      wait = this.opts.drain?.();
    } catch (err) {
      return cb(err as Error);
    }
    if (!wait) return cb(null);
    wait.then(
      () => cb(null),
      (err: Error) => cb(err),
    );
  }

  override _flush(cb: (err: Error | null) => void): void {
    this.finish().then(
      () => cb(null),
      (err: Error) => cb(err),
    );
  }

  /**
   * Sends the prefix; returns the beforeFirstRange gate to await before the
   * first encode(). For a caller that drives the encoder itself (a sink,
   * not a stream): begin(), encode() every read, finish().
   */
  begin(): Promise<void> | undefined {
    this.start();
    this.writer.flush();
    return this.opts.beforeFirstRange?.();
  }

  /** One read into the output, now (its data is not kept). */
  encode(read: BlockRead): void {
    const extra = this.opts.interject?.();
    if (extra) this.emitRaw(extra);
    this.encodeRange(read);
    if (this.writer.sectionBytes >= SECTION_LIMIT) this.writer.endSection();
    if (read.urgent || this.opts.flushEachRange?.()) {
      this.writer.endSection();
      this.writer.flush();
    } else if (this.gathering) {
      // The read's data is the caller's again when encode() returns.
      this.writer.flush();
    }
    if (read.urgent) this.opts.onUrgentSent?.(read);
    else this.opts.onBackgroundEncoded?.(read);
  }

  /** Closes RAM, awaits beforeSuffix, sends the suffix. */
  async finish(): Promise<void> {
    this.start();
    const extra = this.opts.interject?.();
    if (extra) this.emitRaw(extra);
    this.writer.endRam();
    this.writer.flush();
    const gate = this.opts.beforeSuffix?.();
    if (gate) await gate;
    for (const b of this.opts.suffix()) this.writer.raw(b);
    this.writer.flush();
  }

  private start(): void {
    if (this.started) return;
    this.started = true;
    for (const b of this.opts.prefix) this.writer.raw(b);
  }

  private emitRaw(bufs: Buffer[]): void {
    this.writer.endSection();
    for (const b of bufs) this.writer.raw(b);
    this.writer.flush();
  }

  private encodeRange(read: BlockRead): void {
    const st = this.blocks[read.tag ?? -1];
    if (!st) throw new RangeError(`block read at disk offset ${read.offset} carries no block index`);
    const ps = this.pageSize;
    const base = st.layout.offset;
    const data = read.data;
    const zero = this.zeroPage;
    let page = (read.offset - base) / ps;
    const end = page + read.length / ps;
    for (let i = 0; page < end; page++, i += ps) {
      if (!st.sent.add(page)) continue;
      this.writer.beginSection();
      const address = page * ps;
      // Most data pages differ from zero in their first or last byte: test
      // those in JS before paying for a native compare.
      if (data === null || (data[i] === 0 && data[i + ps - 1] === 0 && data.compare(zero, 0, ps, i, i + ps) === 0)) {
        this.writer.zero(st.name, address);
        this.zeroPagesSent++;
      } else {
        this.writer.page(st.name, address, data, i);
        this.dataPagesSent++;
      }
    }
  }
}
