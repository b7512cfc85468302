import { Transform } from 'streamx';
import { QEMU_VM_FILE_MAGIC, RamFlag, Token } from './constants';
import type { MigrationRecord, RamBlockInfo } from './records';
import { ENCODING_FLAG_XBZRLE } from './xbzrle';

const TWO32 = 4294967296;

// Low-level writers. Each writes at `pos` into a caller-owned buffer (which
// must have room) and returns the position after what it wrote, so that a
// load path can assemble PART sections with no per-page allocation.

/** Largest RAM record header: be64 + u8 length + 255-byte idstr. */
export const RAM_RECORD_HEADER_MAX = 8 + 1 + 255;
/** Bytes of a PART/END section header (token + be32 id) or of a footer. */
export const SECTION_PART_HEADER_LENGTH = 5;
export const SECTION_FOOTER_LENGTH = 5;

export function writeBe64(buf: Buffer, pos: number, value: number): number {
  const hi = Math.floor(value / TWO32);
  buf.writeUInt32BE(hi >>> 0, pos);
  buf.writeUInt32BE((value - hi * TWO32) >>> 0, pos + 4);
  return pos + 8;
}

/** Size of a RAM record header; `idstr` null means CONTINUE (no idstr on the wire). */
export function ramRecordHeaderLength(idstr: Buffer | null): number {
  return idstr === null ? 8 : 9 + idstr.length;
}

/**
 * Writes a RAM record header: be64 (address | flags), then u8 length + idstr
 * unless `idstr` is null, in which case RAM_SAVE_FLAG_CONTINUE is added.
 * `address` must be page aligned; `flags` is e.g. RamFlag.PAGE, RamFlag.ZERO,
 * RamFlag.EOS. The caller writes the page (PAGE) or the fill byte (ZERO).
 */
export function writeRamRecordHeader(buf: Buffer, pos: number, address: number, flags: number, idstr: Buffer | null): number {
  const f = idstr === null && (flags & (RamFlag.PAGE | RamFlag.ZERO | RamFlag.XBZRLE | RamFlag.COMPRESS_PAGE)) !== 0 ? flags | RamFlag.CONTINUE : flags;
  const hi = Math.floor(address / TWO32);
  buf.writeUInt32BE(hi >>> 0, pos);
  buf.writeUInt32BE(((address - hi * TWO32) + f) >>> 0, pos + 4);
  if (idstr === null) return pos + 8;
  buf[pos + 8] = idstr.length;
  idstr.copy(buf, pos + 9);
  return pos + 9 + idstr.length;
}

/** RAM_SAVE_FLAG_EOS record. */
export function writeRamEos(buf: Buffer, pos: number): number {
  buf.writeUInt32BE(0, pos);
  buf.writeUInt32BE(RamFlag.EOS, pos + 4);
  return pos + 8;
}

/** SECTION_PART or SECTION_END header. */
export function writeSectionPart(buf: Buffer, pos: number, token: typeof Token.SECTION_PART | typeof Token.SECTION_END, sectionId: number): number {
  buf[pos] = token;
  buf.writeUInt32BE(sectionId >>> 0, pos + 1);
  return pos + 5;
}

/** SECTION_START or SECTION_FULL header (token, id, idstr, instance id, version id). */
export function writeSectionStart(
  buf: Buffer, pos: number, token: typeof Token.SECTION_START | typeof Token.SECTION_FULL,
  sectionId: number, idstr: Buffer, instanceId: number, versionId: number,
): number {
  buf[pos] = token;
  buf.writeUInt32BE(sectionId >>> 0, pos + 1);
  buf[pos + 5] = idstr.length;
  idstr.copy(buf, pos + 6);
  let p = pos + 6 + idstr.length;
  buf.writeUInt32BE(instanceId >>> 0, p);
  buf.writeUInt32BE(versionId >>> 0, p + 4);
  p += 8;
  return p;
}

export function writeSectionFooter(buf: Buffer, pos: number, sectionId: number): number {
  buf[pos] = Token.SECTION_FOOTER;
  buf.writeUInt32BE(sectionId >>> 0, pos + 1);
  return pos + 5;
}

/** QEMU_VM_COMMAND: token, be16 command, be16 length, payload. */
export function writeCommand(buf: Buffer, pos: number, command: number, payload: Buffer): number {
  buf[pos] = Token.COMMAND;
  buf.writeUInt16BE(command, pos + 1);
  buf.writeUInt16BE(payload.length, pos + 3);
  payload.copy(buf, pos + 5);
  return pos + 5 + payload.length;
}

const idCache = new Map<string, Buffer>();
/** The idstr bytes of a block (cached: blocks are few, pages are many). */
export function blockIdBytes(block: RamBlockInfo | string): Buffer {
  const id = typeof block === 'string' ? block : block.id;
  let b = idCache.get(id);
  if (b === undefined) {
    b = Buffer.from(id, 'latin1');
    if (idCache.size < 4096) idCache.set(id, b);
  }
  return b;
}

function memSizeLength(r: Extract<MigrationRecord, { type: 'ram-mem-size' }>): number {
  let n = 8;
  for (const b of r.blocks) {
    n += 1 + blockIdBytes(b).length + 8;
    if (b.pageSize !== undefined) n += 8;
    if (b.mrAddr !== undefined) n += 8;
  }
  return n;
}

/** Encoded size of a record, excluding payloads returned as separate buffers by encodeRecord. */
function writeFixed(r: MigrationRecord, buf: Buffer | null): number {
  switch (r.type) {
    case 'header':
      if (buf) { buf.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0); buf.writeUInt32BE(r.version, 4); }
      return 8;
    case 'configuration':
      if (buf) { buf[0] = Token.CONFIGURATION; r.raw.copy(buf, 1); }
      return 1 + r.raw.length;
    case 'command':
      if (buf) writeCommand(buf, 0, r.command, r.payload);
      return 5 + r.payload.length;
    case 'section-start':
    case 'section-full': {
      const id = blockIdBytes(r.idstr);
      if (buf) writeSectionStart(buf, 0, r.type === 'section-start' ? Token.SECTION_START : Token.SECTION_FULL, r.sectionId, id, r.instanceId, r.versionId);
      return 14 + id.length;
    }
    case 'section-part':
    case 'section-end':
      if (buf) writeSectionPart(buf, 0, r.type === 'section-part' ? Token.SECTION_PART : Token.SECTION_END, r.sectionId);
      return 5;
    case 'section-footer':
      if (buf) writeSectionFooter(buf, 0, r.sectionId);
      return 5;
    case 'ram-mem-size': {
      const n = memSizeLength(r);
      if (buf) {
        writeRamRecordHeader(buf, 0, r.totalBytes, RamFlag.MEM_SIZE, null);
        let p = 8;
        for (const b of r.blocks) {
          const id = blockIdBytes(b);
          buf[p] = id.length;
          id.copy(buf, p + 1);
          p = writeBe64(buf, p + 1 + id.length, b.length);
          if (b.pageSize !== undefined) p = writeBe64(buf, p, b.pageSize);
          if (b.mrAddr !== undefined) p = writeBe64(buf, p, b.mrAddr);
        }
      }
      return n;
    }
    case 'ram-page': {
      const id = r.continued ? null : blockIdBytes(r.block);
      if (buf) writeRamRecordHeader(buf, 0, r.address, RamFlag.PAGE, id);
      return ramRecordHeaderLength(id);
    }
    case 'ram-zero': {
      const id = r.continued ? null : blockIdBytes(r.block);
      if (buf) {
        const p = writeRamRecordHeader(buf, 0, r.address, RamFlag.ZERO, id);
        buf[p] = r.fill;
      }
      return ramRecordHeaderLength(id) + 1;
    }
    case 'ram-xbzrle': {
      const id = r.continued ? null : blockIdBytes(r.block);
      if (buf) {
        const p = writeRamRecordHeader(buf, 0, r.address, RamFlag.XBZRLE, id);
        buf[p] = ENCODING_FLAG_XBZRLE;
        buf.writeUInt16BE(r.delta.length, p + 1);
      }
      return ramRecordHeaderLength(id) + 3;
    }
    case 'ram-compressed': {
      const id = r.continued ? null : blockIdBytes(r.block);
      if (buf) buf.writeUInt32BE(r.data.length, writeRamRecordHeader(buf, 0, r.address, RamFlag.COMPRESS_PAGE, id));
      return ramRecordHeaderLength(id) + 4;
    }
    case 'ram-eos':
      if (buf) writeRamEos(buf, 0);
      return 8;
    case 'ram-multifd-flush':
      if (buf) writeRamRecordHeader(buf, 0, 0, RamFlag.MULTIFD_FLUSH, null);
      return 8;
    case 'device-state':
      return 0;
    case 'eof':
      if (buf) buf[0] = Token.EOF;
      return 1;
    case 'vmdescription':
      if (buf) { buf[0] = Token.VMDESCRIPTION; buf.writeUInt32BE(r.raw.length, 1); }
      return 5;
  }
}

function payloadOf(r: MigrationRecord): Buffer | null {
  switch (r.type) {
    case 'ram-page':
    case 'device-state':
      return r.data;
    case 'ram-xbzrle':
      return r.delta;
    case 'ram-compressed':
      return r.data;
    case 'vmdescription':
      return r.raw;
    default:
      return null;
  }
}

/**
 * The bytes of one record, as a header buffer and (for pages, device state
 * and the VM description) the payload buffer itself. Allocates: for hot
 * paths use MigrationEncoder or the write* helpers.
 */
export function encodeRecord(r: MigrationRecord): Buffer[] {
  const n = writeFixed(r, null);
  const out: Buffer[] = [];
  if (n > 0) {
    const buf = Buffer.allocUnsafe(n);
    writeFixed(r, buf);
    out.push(buf);
  }
  const payload = payloadOf(r);
  if (payload !== null && payload.length > 0) out.push(payload);
  return out;
}

export interface MigrationEncoderOptions {
  /** Size of the output buffers it fills before pushing (default 1 MiB). */
  bufferSize?: number;
}

/** Payloads at least this large are pushed as they are instead of copied. */
const PASS_THROUGH = 64 * 1024;

/**
 * Records in, stream bytes out, coalesced into large buffers: many small
 * writes to a pipe are slow. A partly filled buffer is pushed once the
 * writer pauses (setImmediate), so a live peer never waits on a page that
 * sits in our buffer.
 */
export class MigrationEncoder extends Transform {
  private readonly bufferSize: number;
  private out: Buffer;
  private pos = 0;
  private immediate: NodeJS.Immediate | null = null;
  private readonly scratch = Buffer.allocUnsafe(RAM_RECORD_HEADER_MAX + 1);

  constructor(opts: MigrationEncoderOptions = {}) {
    super({
      highWaterMark: 4 * 1024 * 1024,
      byteLengthWritable: (r: unknown) => (Buffer.isBuffer(r) ? r.length : (payloadOf(r as MigrationRecord)?.length ?? 64)),
    });
    this.bufferSize = Math.max(opts.bufferSize ?? 1024 * 1024, 64 * 1024);
    this.out = Buffer.allocUnsafe(this.bufferSize);
  }

  override _transform(data: unknown, cb: (err: Error | null, mapped: unknown) => void): void {
    try {
      this.encode(data as MigrationRecord);
    } catch (err) {
      return cb(err as Error, null);
    }
    if (this.pos > 0 && this.immediate === null) {
      this.immediate = setImmediate(() => {
        this.immediate = null;
        this.flushOut();
      });
    }
    cb(null, null);
  }

  override _flush(cb: (err: Error | null) => void): void {
    this.flushOut();
    cb(null);
  }

  override _destroy(cb: (err: Error | null) => void): void {
    if (this.immediate !== null) clearImmediate(this.immediate);
    this.immediate = null;
    cb(null);
  }

  /** Typed push: the readable side carries stream bytes only. */
  override push(chunk: Buffer | null): boolean {
    return super.push(chunk);
  }

  /** Pushes whatever is buffered now. */
  flushOut(): void {
    if (this.pos === 0) return;
    const chunk = this.out.subarray(0, this.pos);
    this.push(chunk);
    // The pushed buffer now belongs to the consumer: continue in a fresh one,
    // keeping the tail of the old one when it is still large.
    const rest = this.out.length - this.pos;
    if (rest >= 256 * 1024) this.out = this.out.subarray(this.pos);
    else this.out = Buffer.allocUnsafe(this.bufferSize);
    this.pos = 0;
  }

  private room(n: number): void {
    if (this.pos + n > this.out.length) this.flushOut();
    if (n > this.out.length) this.out = Buffer.allocUnsafe(Math.max(n, this.bufferSize));
  }

  private encode(r: MigrationRecord): void {
    if (r.type === 'ram-page') {
      const id = r.continued ? null : blockIdBytes(r.block);
      this.room(ramRecordHeaderLength(id) + r.data.length);
      this.pos = writeRamRecordHeader(this.out, this.pos, r.address, RamFlag.PAGE, id);
      this.pos += r.data.copy(this.out, this.pos);
      return;
    }
    if (r.type === 'ram-zero') {
      const id = r.continued ? null : blockIdBytes(r.block);
      this.room(ramRecordHeaderLength(id) + 1);
      this.pos = writeRamRecordHeader(this.out, this.pos, r.address, RamFlag.ZERO, id);
      this.out[this.pos++] = r.fill;
      return;
    }
    const n = writeFixed(r, null);
    if (n > 0) {
      this.room(n);
      const buf = n <= this.scratch.length ? this.scratch : Buffer.allocUnsafe(n);
      writeFixed(r, buf);
      this.pos += buf.copy(this.out, this.pos, 0, n);
    }
    const payload = payloadOf(r);
    if (payload === null || payload.length === 0) return;
    if (payload.length >= PASS_THROUGH) {
      this.flushOut();
      this.push(payload);
      return;
    }
    this.room(payload.length);
    this.pos += payload.copy(this.out, this.pos);
  }
}
