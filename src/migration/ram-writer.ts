// Writes RAM section records (PART sections of PAGE/ZERO records, EOS,
// footers) into large output chunks. This is the load path's hot loop: one
// call per page, no allocation per page, page data copied once into the
// chunk that goes to the pipe (many small writes to a pipe are far slower
// than one copy).
import { Token, RamFlag } from './constants';

/** A RAM block as the writer needs it: its idstr, pre-encoded. */
export interface RamBlockName {
  id: string;
  /** u8 length + idstr bytes, as they follow a record header without CONTINUE. */
  encodedId: Buffer;
}

export function ramBlockName(id: string): RamBlockName {
  const bytes = Buffer.from(id, 'latin1');
  if (bytes.length === 0 || bytes.length > 255) throw new RangeError(`RAM block idstr '${id}' must be 1..255 bytes`);
  const encodedId = Buffer.alloc(1 + bytes.length);
  encodedId[0] = bytes.length;
  bytes.copy(encodedId, 1);
  return { id, encodedId };
}

export class RamRecordWriter {
  private out: Buffer;
  private pos = 0;
  private lastBlock: RamBlockName | null = null;
  private inSection = false;
  /** Bytes of RAM records in the open section. */
  sectionBytes = 0;

  /**
   * @param sectionId the ram section's id from the leader's START section
   * @param emit receives each full chunk; it owns the buffer afterwards
   */
  constructor(
    private readonly sectionId: number,
    private readonly pageSize: number,
    private readonly emit: (chunk: Buffer) => void,
    private readonly chunkSize = 1 << 20,
  ) {
    this.out = Buffer.allocUnsafe(chunkSize);
  }

  get sectionOpen(): boolean {
    return this.inSection;
  }

  beginSection(): void {
    if (this.inSection) return;
    this.reserve(5);
    this.out[this.pos] = Token.SECTION_PART;
    this.out.writeUInt32BE(this.sectionId, this.pos + 1);
    this.pos += 5;
    this.inSection = true;
    this.sectionBytes = 0;
    // Name the block again in every section: a destination need not carry
    // "the previous block" across sections.
    this.lastBlock = null;
  }

  /** PAGE record: header, idstr unless CONTINUE, then the page from `data` at `dataOffset`. */
  page(block: RamBlockName, address: number, data: Buffer, dataOffset: number): void {
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
    writeBe64(this.out, this.pos, 0, RamFlag.EOS);
    this.out[this.pos + 8] = Token.SECTION_FOOTER;
    this.out.writeUInt32BE(this.sectionId, this.pos + 9);
    this.pos += 13;
    this.inSection = false;
  }

  /** The ram section's END: just EOS and the footer, as QEMU closes RAM before the device state. */
  endRam(): void {
    this.endSection();
    this.reserve(18);
    this.out[this.pos] = Token.SECTION_END;
    this.out.writeUInt32BE(this.sectionId, this.pos + 1);
    writeBe64(this.out, this.pos + 5, 0, RamFlag.EOS);
    this.out[this.pos + 13] = Token.SECTION_FOOTER;
    this.out.writeUInt32BE(this.sectionId, this.pos + 14);
    this.pos += 18;
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
    if (this.pos === 0) return;
    this.emit(this.out.subarray(0, this.pos));
    this.out = Buffer.allocUnsafe(this.chunkSize);
    this.pos = 0;
  }

  private recordHeader(block: RamBlockName, address: number, flags: number, payload: number): number {
    const cont = block === this.lastBlock;
    const len = 8 + (cont ? 0 : block.encodedId.length);
    this.reserve(len + payload);
    // address is page aligned, so the flags fit in the low bits.
    writeBe64(this.out, this.pos, Math.floor(address / 0x100000000), (address >>> 0) | flags | (cont ? RamFlag.CONTINUE : 0));
    this.pos += 8;
    if (!cont) {
      block.encodedId.copy(this.out, this.pos);
      this.pos += block.encodedId.length;
      this.lastBlock = block;
    }
    return len;
  }

  private reserve(n: number): void {
    if (this.pos + n > this.chunkSize) this.flush();
  }
}

function writeBe64(buf: Buffer, pos: number, hi: number, lo: number): void {
  buf.writeUInt32BE(hi >>> 0, pos);
  buf.writeUInt32BE(lo >>> 0, pos + 4);
}
