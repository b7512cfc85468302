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
import { encodeRecord } from '../migration/encoder';

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
  /**
   * multifd restore: data pages go to the channels instead of the main
   * stream (zero pages stay on it: 7.2 cannot take them in packets), and
   * every sync mark the main stream gets is reported, flushed out first.
   */
  multifd?: MultifdPageSink;
  /** With `sink`: awaited after each read is encoded, before the next (a full pipe's leftovers). */
  drain?: () => Promise<void> | null;
}

/**
 * Where a multifd restore's data pages go. A QEMU destination waits at each
 * sync mark of the main stream until every channel delivered one SYNC packet
 * (multifd_recv_sync_main), and a channel waits after its SYNC until the
 * main stream reached the mark: the counts must match exactly.
 */
export interface MultifdPageSink {
  /**
   * Which main-stream records are sync marks on the destination: 'eos' every
   * RAM EOS (QEMU 7.2, and later QEMUs with machine types up to 8.0, where
   * multifd-flush-after-each-section is on), 'flush' only MULTIFD_FLUSH
   * records (later machine types); the encoder then adds one MULTIFD_FLUSH
   * after the last page, so every page has landed before the device state.
   */
  readonly marks: 'eos' | 'flush';
  /** A data page of block `block` at `address`; `data` is the caller's again when this returns. */
  page(block: string, address: number, data: Buffer, at: number): void;
  /** The main stream just got a sync mark (already handed on): every channel gets its SYNC now. */
  sync(): void;
  /** After each range: a promise while the channels hold more than they may (backpressure). */
  whenWritable(): Promise<void> | null;
}

const MULTIFD_FLUSH_RECORD = Buffer.concat(encodeRecord({ type: 'ram-multifd-flush', offset: 0 }));

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
    // The main stream's leftovers first, then the channels' backpressure.
    const multifd = this.opts.multifd;
    if (wait && multifd) wait = wait.then(() => multifd.whenWritable() ?? undefined);
    else if (!wait) wait = multifd?.whenWritable();
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
    if (this.writer.sectionBytes >= SECTION_LIMIT) this.endSection();
    if (read.urgent || this.opts.flushEachRange?.()) {
      this.endSection();
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
    const mf = this.opts.multifd;
    if (mf?.marks === 'flush') {
      this.writer.beginSection();
      this.writer.raw(MULTIFD_FLUSH_RECORD);
      this.writer.endSection();
      this.markSync();
    } else {
      this.endSection();
    }
    this.writer.endRam();
    if (mf?.marks === 'eos') this.markSync();
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

  /** Ends the open section; with multifd on EOS marks, that EOS is a sync point. */
  private endSection(): void {
    const wasOpen = this.writer.open;
    this.writer.endSection();
    if (wasOpen && this.opts.multifd?.marks === 'eos') this.markSync();
  }

  /** The mark goes out before the channels' SYNC packets can hold their threads at it. */
  private markSync(): void {
    this.writer.flush();
    this.opts.multifd?.sync();
  }

  private emitRaw(bufs: Buffer[]): void {
    this.endSection();
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
    const multifd = this.opts.multifd;
    let page = (read.offset - base) / ps;
    const end = page + read.length / ps;
    for (let i = 0; page < end; page++, i += ps) {
      if (!st.sent.add(page)) continue;
      const address = page * ps;
      // Most data pages differ from zero in their first or last byte: test
      // those in JS before paying for a native compare.
      if (data === null || (data[i] === 0 && data[i + ps - 1] === 0 && data.compare(zero, 0, ps, i, i + ps) === 0)) {
        this.writer.beginSection();
        this.writer.zero(st.name, address);
        this.zeroPagesSent++;
      } else if (multifd) {
        multifd.page(st.layout.id, address, data, i);
        this.dataPagesSent++;
      } else {
        this.writer.beginSection();
        this.writer.page(st.name, address, data, i);
        this.dataPagesSent++;
      }
    }
  }
}
