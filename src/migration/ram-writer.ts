// Writes RAM section records (PART sections of PAGE/ZERO records, EOS,
// footers) into large output chunks. This is the load path's hot loop: one
// call per page, no allocation per page, page data copied once into the
// chunk that goes to the pipe (many small writes to a pipe are far slower
// than one copy).
import { Token, RamFlag } from './constants';
import { ramRecordHeaderLength, writeRamEos, writeRamRecordHeader, writeSectionFooter, writeSectionPart } from './encoder';

/** A RAM block as the writer needs it: its idstr bytes, encoded once. */
export interface RamBlockName {
  id: string;
  idBytes: Buffer;
}

export function ramBlockName(id: string): RamBlockName {
  const idBytes = Buffer.from(id, 'latin1');
  if (idBytes.length === 0 || idBytes.length > 255) throw new RangeError(`RAM block idstr '${id}' must be 1..255 bytes`);
  return { id, idBytes };
}

/**
 * Takes gathered output and is done with it when it returns: `count`
 * triples (index into `buffers`, offset, length) in `segments`, `bytes` in
 * all. Buffer 0 is the writer's own (headers); the others are page data it
 * was lent.
 */
export type SegmentSink = (buffers: Buffer[], segments: Float64Array, count: number, bytes: number) => void;

/** Segments per gathered write: two per page (header, data). */
const MAX_SEGMENTS = 1024;
/** The native writeSegments takes at most 16 buffers, the writer's own among them. */
const MAX_BUFFERS = 16;

export class RamRecordWriter {
  private out: Buffer;
  private pos = 0;
  private lastBlock: RamBlockName | null = null;
  private inSection = false;
  /** Bytes of RAM records in the open section. */
  sectionBytes = 0;
  // Gather mode: pages stay where the caller has them and go out by
  // reference, next to the headers in `out`.
  private readonly segments: Float64Array | null;
  private segmentCount = 0;
  private segmentBytes = 0;
  private readonly buffers: Buffer[] = [];
  /** Start of the bytes in `out` that no segment covers yet. */
  private segmentFrom = 0;

  /**
   * @param sectionId the ram section's id from the leader's START section
   * @param emit receives each full chunk; it owns the buffer afterwards,
   *   unless `lend` is set
   * @param lend emit() is done with a chunk when it returns (a synchronous
   *   write): the writer fills the same buffer again. A fresh 1 MiB buffer
   *   per chunk costs page faults (~0.1 s per GiB of stream) and cache misses.
   * @param gather when set, pages are not copied: flush() hands the sink the
   *   headers and the callers' page data as segments, and the caller must
   *   flush() before it reuses data it passed to page(). With a gathering
   *   write (writev) this saves the copy of every page; `emit` then only
   *   gets raw() data too large to buffer, and `lend` plays no part (the
   *   sink is done with `out` when it returns).
   */
  constructor(
    private readonly sectionId: number,
    private readonly pageSize: number,
    private readonly emit: (chunk: Buffer) => void,
    private readonly chunkSize = 1 << 20,
    private readonly lend = false,
    private readonly gather: SegmentSink | null = null,
  ) {
    this.out = Buffer.allocUnsafe(chunkSize);
    this.segments = gather ? new Float64Array(3 * MAX_SEGMENTS) : null;
    if (gather) this.buffers.push(this.out);
  }

  /** A PART section is open (endSection() would write an EOS). */
  get open(): boolean {
    return this.inSection;
  }

  beginSection(): void {
    if (this.inSection) return;
    this.reserve(5);
    this.pos = writeSectionPart(this.out, this.pos, Token.SECTION_PART, this.sectionId);
    this.inSection = true;
    this.sectionBytes = 0;
    // Name the block again in every section: a destination need not carry
    // "the previous block" across sections.
    this.lastBlock = null;
  }

  /** PAGE record: header, idstr unless CONTINUE, then the page from `data` at `dataOffset`. */
  page(block: RamBlockName, address: number, data: Buffer, dataOffset: number): void {
    if (this.segments) {
      const headerLen = this.recordHeader(block, address, RamFlag.PAGE, 0);
      this.borrow(data, dataOffset, this.pageSize);
      this.sectionBytes += headerLen + this.pageSize;
      return;
    }
    const headerLen = this.recordHeader(block, address, RamFlag.PAGE, this.pageSize);
    data.copy(this.out, this.pos, dataOffset, dataOffset + this.pageSize);
    this.pos += this.pageSize;
    this.sectionBytes += headerLen + this.pageSize;
  }

  /** ZERO record: header, idstr unless CONTINUE, fill byte 0. */
  zero(block: RamBlockName, address: number): void {
    const headerLen = this.recordHeader(block, address, RamFlag.ZERO, 1);
    this.out[this.pos++] = 0;
    this.sectionBytes += headerLen + 1;
  }

  /** EOS and the section footer. */
  endSection(): void {
    if (!this.inSection) return;
    this.reserve(13);
    this.pos = writeSectionFooter(this.out, writeRamEos(this.out, this.pos), this.sectionId);
    this.inSection = false;
  }

  /** The ram section's END: just EOS and the footer, as QEMU closes RAM before the device state. */
  endRam(): void {
    this.endSection();
    this.reserve(18);
    const pos = writeRamEos(this.out, writeSectionPart(this.out, this.pos, Token.SECTION_END, this.sectionId));
    this.pos = writeSectionFooter(this.out, pos, this.sectionId);
  }

  /** Arbitrary stream bytes (leader, commands, device state), after what is buffered. */
  raw(data: Buffer): void {
    if (data.length <= this.chunkSize - this.pos) {
      data.copy(this.out, this.pos);
      this.pos += data.length;
      return;
    }
    this.flush();
    this.emit(data);
  }

  /** Emits what is buffered. */
  flush(): void {
    if (this.gather) {
      this.flushSegments(this.gather);
      return;
    }
    if (this.pos === 0) return;
    const chunk = this.out.subarray(0, this.pos);
    if (!this.lend) this.out = Buffer.allocUnsafe(this.chunkSize);
    this.pos = 0;
    this.emit(chunk);
  }

  /** Header with the idstr, or CONTINUE within the block of the previous record. */
  private recordHeader(block: RamBlockName, address: number, flags: number, payload: number): number {
    const idstr = block === this.lastBlock ? null : block.idBytes;
    const len = ramRecordHeaderLength(idstr);
    this.reserve(len + payload);
    this.pos = writeRamRecordHeader(this.out, this.pos, address, flags, idstr);
    this.lastBlock = block;
    return len;
  }

  /** Gather mode: `length` bytes of `data` from `offset` go out next, by reference. */
  private borrow(data: Buffer, offset: number, length: number): void {
    const buffers = this.buffers;
    let index = buffers.length - 1;
    if (buffers[index] !== data) {
      if (buffers.length === MAX_BUFFERS) this.flush();
      index = buffers.push(data) - 1;
    }
    // Room for the header before this page, the page, and the bytes that
    // follow it in `out` when flush() closes them into a last segment.
    if (this.segmentCount + 3 > MAX_SEGMENTS) {
      this.flush();
      index = buffers.push(data) - 1;
    }
    this.closeOutSegment();
    this.addSegment(index, offset, length);
  }

  /** Gather mode: the bytes written into `out` since the last segment become one. */
  private closeOutSegment(): void {
    if (this.pos > this.segmentFrom) this.addSegment(0, this.segmentFrom, this.pos - this.segmentFrom);
    this.segmentFrom = this.pos;
  }

  private addSegment(buffer: number, offset: number, length: number): void {
    const s = this.segments as Float64Array;
    const k = this.segmentCount++ * 3;
    s[k] = buffer;
    s[k + 1] = offset;
    s[k + 2] = length;
    this.segmentBytes += length;
  }

  private flushSegments(sink: SegmentSink): void {
    this.closeOutSegment();
    const count = this.segmentCount;
    const bytes = this.segmentBytes;
    this.segmentCount = 0;
    this.segmentBytes = 0;
    this.pos = 0;
    this.segmentFrom = 0;
    if (count > 0) sink(this.buffers, this.segments as Float64Array, count, bytes);
    this.buffers.length = 1;
  }

  private reserve(n: number): void {
    if (this.pos + n > this.chunkSize) this.flush();
  }
}
