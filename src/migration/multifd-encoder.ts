// The sending side of the multifd channel codec (multifd.ts parses what this
// writes): the MultiFDInit_t that opens a channel and MultiFDPacket_t packets
// of uncompressed pages, as QEMU's multifd_send_initial_packet and
// multifd_ram_fill_packet / multifd_send_fill_packet write them.
//
// What a QEMU destination checks (multifd_recv_initial_packet,
// multifd_ram_unfill_packet in 7.2 and 10.0): magic, version 1, the uuid
// against its own (query-uuid), a channel id below multifd-channels and not
// seen before; per packet magic, version, no compression flag, pages_alloc
// at most 512 KiB / page size, normal_pages (+ zero_pages on 9.0 and later)
// at most pages_alloc, a RAM block it has, and offsets inside that block.
// The offset array always has 512 KiB / page size entries.
import { MULTIFD_HEADER_SIZE, MULTIFD_INIT_SIZE, MULTIFD_MAGIC, MULTIFD_PACKET_BYTES, MULTIFD_VERSION, MultifdFlag } from './multifd';

/** The 64-byte header a multifd channel opens with. */
export function encodeMultifdInit(uuid: Buffer, channel: number): Buffer {
  if (uuid.length !== 16) throw new RangeError(`multifd uuid must be 16 bytes, not ${uuid.length}`);
  if (!Number.isInteger(channel) || channel < 0 || channel > 255) throw new RangeError(`multifd channel id ${channel} is not 0..255`);
  const b = Buffer.alloc(MULTIFD_INIT_SIZE);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  uuid.copy(b, 8);
  b[24] = channel;
  return b;
}

/** A uuid as query-uuid prints it ("xxxxxxxx-xxxx-...") → its 16 bytes. */
export function parseUuid(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new RangeError(`'${text}' is not a uuid`);
  return Buffer.from(hex, 'hex');
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x1_0000_0000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/**
 * Builds packets one at a time: pages of one RAM block are copied into a
 * buffer that holds the header, the offset array and up to 512 KiB of data;
 * take() finishes the header and hands the packet over (a fresh buffer per
 * packet: the packet may sit in a socket's queue while the next is filled).
 */
export class MultifdPacketBuilder {
  readonly pageSize: number;
  /** Pages a packet holds (the offset array's length). */
  readonly slots: number;
  readonly headerSize: number;
  private buf: Buffer | null = null;
  private blockName = '';
  private normal = 0;
  private zero = 0;
  private readonly zeroOffsets: number[] = [];
  /** Packet buffers handed back with recycle(), filled again instead of fresh ones. */
  private readonly free: ArrayBuffer[] = [];

  constructor(pageSize = 4096) {
    if (!Number.isInteger(pageSize) || pageSize < 512 || pageSize > MULTIFD_PACKET_BYTES || (pageSize & (pageSize - 1)) !== 0) {
      throw new RangeError(`multifd page size ${pageSize} is not a power of two from 512 to 512 KiB`);
    }
    this.pageSize = pageSize;
    this.slots = MULTIFD_PACKET_BYTES / pageSize;
    this.headerSize = MULTIFD_HEADER_SIZE + 8 * this.slots;
  }

  /** RAM block of the packet being filled ('' when empty). */
  get block(): string {
    return this.blockName;
  }

  get pages(): number {
    return this.normal + this.zero;
  }

  get full(): boolean {
    return this.normal + this.zero >= this.slots;
  }

  /** Starts a packet for `block` (the previous one must have been taken or be empty). */
  begin(block: string): void {
    if (this.pages > 0) throw new Error('multifd packet builder: begin() with pages not taken');
    const nameLength = Buffer.byteLength(block, 'latin1');
    if (nameLength === 0 || nameLength > 255) throw new RangeError(`RAM block idstr '${block}' must be 1..255 bytes`);
    this.blockName = block;
  }

  /** Adds a data page: `pageSize` bytes of `data` from `at`, at byte `offset` of the block. */
  page(offset: number, data: Buffer, at: number): void {
    if (this.full) throw new RangeError('multifd packet is full');
    const buf = (this.buf ??= this.fresh());
    writeU64(buf, offset, MULTIFD_HEADER_SIZE + 8 * this.normal);
    data.copy(buf, this.headerSize + this.normal * this.pageSize, at, at + this.pageSize);
    this.normal++;
  }

  /** Adds an all-zero page (QEMU 9.0 and later take these; 7.2 does not read zero_pages). */
  zeroPage(offset: number): void {
    if (this.full) throw new RangeError('multifd packet is full');
    this.zeroOffsets.push(offset);
    this.zero++;
  }

  /**
   * A packet take() returned is free again (its write completed): its
   * buffer is reused, which saves the page faults of a fresh 512 KiB one.
   */
  recycle(packet: Buffer): void {
    const size = this.headerSize + MULTIFD_PACKET_BYTES;
    if (packet.byteOffset === 0 && packet.buffer.byteLength === size && this.free.length < 16) this.free.push(packet.buffer as ArrayBuffer);
  }

  private fresh(): Buffer {
    const ab = this.free.pop();
    return ab ? Buffer.from(ab) : Buffer.allocUnsafeSlow(this.headerSize + MULTIFD_PACKET_BYTES);
  }

  /** The finished packet (header, offsets, data), numbered `packetNum`, with `flags` (SYNC). */
  take(packetNum: number, flags = 0): Buffer {
    const buf = this.buf ?? Buffer.allocUnsafe(this.headerSize);
    this.buf = null;
    const normal = this.normal;
    buf.writeUInt32BE(MULTIFD_MAGIC, 0);
    buf.writeUInt32BE(MULTIFD_VERSION, 4);
    buf.writeUInt32BE(flags & MultifdFlag.SYNC, 8);
    buf.writeUInt32BE(this.slots, 12); // pages_alloc
    buf.writeUInt32BE(normal, 16);
    buf.writeUInt32BE(normal * this.pageSize, 20); // next_packet_size: the data that follows
    writeU64(buf, packetNum, 24);
    buf.writeUInt32BE(this.zero, 32);
    buf.fill(0, 36, 64);
    // ramblock[256], NUL-padded.
    buf.fill(0, 64, MULTIFD_HEADER_SIZE);
    if (this.pages > 0) buf.write(this.blockName, 64, 'latin1');
    for (let i = 0; i < this.zero; i++) writeU64(buf, this.zeroOffsets[i], MULTIFD_HEADER_SIZE + 8 * (normal + i));
    const used = MULTIFD_HEADER_SIZE + 8 * (normal + this.zero);
    buf.fill(0, used, this.headerSize);
    this.normal = 0;
    this.zero = 0;
    this.zeroOffsets.length = 0;
    this.blockName = '';
    return buf.subarray(0, this.headerSize + normal * this.pageSize);
  }
}

/** A SYNC packet without pages: one per channel at every sync mark of the main stream. */
export function encodeMultifdSync(pageSize: number, packetNum: number): Buffer {
  return new MultifdPacketBuilder(pageSize).take(packetNum, MultifdFlag.SYNC);
}
