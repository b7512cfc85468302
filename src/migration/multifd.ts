// The multifd channel codec: what QEMU sends on each extra migration channel
// when the `multifd` capability is on (migration/multifd.h, multifd.c and
// multifd-nocomp.c in QEMU). The main channel still carries the ordinary
// stream (MigrationFramer); the multifd channels carry RAM pages in packets.
//
// Each channel starts with a 64-byte MultiFDInit_t:
//   be32 magic 0x11223344, be32 version 1, uuid[16], u8 channel id,
//   7 bytes padding, 4 × be64 unused.
// Then packets, each a fixed-size MultiFDPacket_t followed by the pages:
//   be32 magic, be32 version, be32 flags, be32 pages_alloc, be32 normal_pages,
//   be32 next_packet_size, be64 packet_num,
//   be32 zero_pages (9.0 and later; 7.2 sends 0 there: unused), be32 unused,
//   3 × be64 unused, char ramblock[256],
//   be64 offset[P]  (P = 512 KiB / target page size: the array has that size
//                    whatever the counts; normal offsets first, then zero ones)
//   normal_pages × page size of data (no compression).
// Measured on 7.2 and 10.0.2: a SYNC packet has no pages and may carry a
// stale next_packet_size (7.2) or pages_alloc 0 (10.0), so the data length is
// normal_pages × page size, not next_packet_size, and the offset array is
// always P entries long.
//
// Ordering (what makes a re-sent page win): QEMU sends a page at most once
// between two sync points. At a sync point the source sends one SYNC packet on
// every channel (multifd_send_sync_main) and marks the main stream, and a
// QEMU destination stops at that mark until every channel has delivered its
// SYNC (multifd_recv_sync_main). The mark is RAM_SAVE_FLAG_EOS on 7.2, and on
// 8.0 and later either EOS (machine types with multifd-flush-after-each-section
// on, i.e. 7.2 and older ones) or RAM_SAVE_FLAG_MULTIFD_FLUSH (newer ones). So
// copies of a page on different channels are ordered by how many SYNC packets
// came before them on their own channel: this parser reports that count as
// each packet's `epoch`. A consumer that applies epoch k of every channel
// before epoch k+1 of any, and takes the main stream's records between marks
// k and k+1 into epoch k, stores what a QEMU destination would.
import { Transform } from 'streamx';
import { QemuSnapError } from '../errors';

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_SIZE = 64;
/** Bytes of RAM one packet describes at most (MULTIFD_PACKET_SIZE). */
export const MULTIFD_PACKET_BYTES = 512 * 1024;
/** Size of the packet header before the offset array. */
export const MULTIFD_HEADER_SIZE = 64 + 256;

export const MultifdFlag = {
  SYNC: 1 << 0,
  /** Compression method, bits 1-3 (0 = none). */
  COMPRESSION_MASK: 7 << 1,
} as const;

const COMPRESSION_NAMES: Record<number, string> = { 1: 'zlib', 2: 'zstd', 3: 'qpl', 4: 'uadk', 5: 'qatzip' };

/** A multifd channel's bytes are not what QEMU sends; carries the channel byte offset. */
export class MultifdChannelError extends QemuSnapError {
  constructor(readonly channel: number, readonly offset: number, detail: string) {
    super(`bad multifd stream on channel ${channel < 0 ? '?' : channel} at byte ${offset}: ${detail}`);
  }
}

export interface MultifdInitRecord {
  type: 'multifd-init';
  /** The channel number the source gave this connection (0-based). */
  channel: number;
  uuid: Buffer;
}

export interface MultifdPacketRecord {
  type: 'multifd-packet';
  /** Byte offset of the packet in its channel. */
  offset: number;
  channel: number;
  packetNum: number;
  /** SYNC packets seen on this channel before this one. */
  epoch: number;
  sync: boolean;
  /** RAM block id; '' for a SYNC packet without pages. */
  block: string;
  /** Offsets within the block of the pages whose data follows, in order. */
  normal: number[];
  /** Offsets within the block of pages that are all zero (9.0 and later). */
  zero: number[];
  /** normal.length × page size bytes: page i at i × page size. */
  data: Buffer;
}

export type MultifdRecord = MultifdInitRecord | MultifdPacketRecord;

export interface MultifdChannelParserOptions {
  /** Target page size of the migration (from the main stream's configuration). */
  pageSize?: number;
  /** Length of a RAM block by id, or undefined when the main stream never announced it. */
  blockLength: (id: string) => number | undefined;
}

function u64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 0x1_0000_0000 + buf.readUInt32BE(at + 4);
}

/**
 * Bytes of one multifd channel → records: the init, then one record per
 * packet. Page data is sliced from the input where a packet lies in one
 * chunk, and copied once where it straddles chunks.
 */
export class MultifdChannelParser extends Transform {
  private readonly pageSize: number;
  /** Entries of every packet's offset array. */
  private readonly slots: number;
  private readonly packetHeaderSize: number;
  private readonly blockLength: (id: string) => number | undefined;
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Channel bytes consumed before the first buffered chunk byte. */
  private consumed = 0;
  private channel = -1;
  private epoch = 0;
  private failed = false;

  constructor(opts: MultifdChannelParserOptions) {
    // Parsed packets waiting to be read count by their data: about two
    // packets per channel, whatever the number of channels.
    super({
      highWaterMark: 1 << 20,
      byteLengthReadable: (r: unknown) => ((r as MultifdRecord).type === 'multifd-packet' ? (r as MultifdPacketRecord).data.length + MULTIFD_HEADER_SIZE : 64),
    });
    const pageSize = opts.pageSize ?? 4096;
    if (!Number.isInteger(pageSize) || pageSize < 512 || pageSize > MULTIFD_PACKET_BYTES || (pageSize & (pageSize - 1)) !== 0) {
      throw new RangeError(`multifd page size ${pageSize} is not a power of two from 512 to 512 KiB`);
    }
    this.pageSize = pageSize;
    this.slots = MULTIFD_PACKET_BYTES / pageSize;
    this.packetHeaderSize = MULTIFD_HEADER_SIZE + 8 * this.slots;
    this.blockLength = opts.blockLength;
  }

  /** The channel number from the init, or -1 before it arrived. */
  get channelId(): number {
    return this.channel;
  }

  override _transform(data: unknown, cb: (err: Error | null, mapped?: unknown) => void): void {
    const chunk = data as Buffer;
    if (this.failed) return cb(null);
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    try {
      this.parse();
      cb(null);
    } catch (err) {
      this.failed = true;
      cb(err as Error);
    }
  }

  /** Typed push: the readable side carries MultifdRecord objects only. */
  override push(record: MultifdRecord | null): boolean {
    return super.push(record);
  }

  override _flush(cb: (err: Error | null) => void): void {
    if (this.buffered > 0) {
      cb(new MultifdChannelError(this.channel, this.consumed, `${this.channel < 0 ? 'channel header' : 'packet'} cut short (${this.buffered} bytes left over)`));
      return;
    }
    if (this.channel < 0) {
      cb(new MultifdChannelError(this.channel, 0, 'the channel closed before its header'));
      return;
    }
    cb(null);
  }

  /** The next n bytes as one Buffer (a slice when they lie in one chunk); consumes them. */
  private take(n: number): Buffer {
    const head = this.chunks[0];
    let out: Buffer;
    if (head.length >= n) {
      out = head.subarray(0, n);
      if (head.length === n) this.chunks.shift();
      else this.chunks[0] = head.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0];
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    this.consumed += n;
    return out;
  }

  /** The first n buffered bytes without consuming them (n ≤ buffered). */
  private peek(n: number): Buffer {
    const head = this.chunks[0];
    if (head.length >= n) return head.subarray(0, n);
    const merged = Buffer.concat(this.chunks, this.buffered);
    this.chunks = [merged];
    return merged.subarray(0, n);
  }

  private fail(at: number, detail: string): never {
    throw new MultifdChannelError(this.channel, at, detail);
  }

  private parse(): void {
    if (this.channel < 0) {
      if (this.buffered < MULTIFD_INIT_SIZE) return;
      const init = this.take(MULTIFD_INIT_SIZE);
      const magic = init.readUInt32BE(0);
      if (magic !== MULTIFD_MAGIC) this.fail(0, `channel header magic 0x${magic.toString(16)} is not multifd's 0x${MULTIFD_MAGIC.toString(16)}`);
      const version = init.readUInt32BE(4);
      if (version !== MULTIFD_VERSION) this.fail(4, `multifd version ${version} is not supported (only ${MULTIFD_VERSION})`);
      this.channel = init[24];
      this.push({ type: 'multifd-init', channel: this.channel, uuid: Buffer.from(init.subarray(8, 24)) });
    }
    for (;;) {
      if (this.buffered < this.packetHeaderSize) return;
      const at = this.consumed;
      const h = this.peek(MULTIFD_HEADER_SIZE);
      const magic = h.readUInt32BE(0);
      if (magic !== MULTIFD_MAGIC) this.fail(at, `packet magic 0x${magic.toString(16)} is not multifd's 0x${MULTIFD_MAGIC.toString(16)}`);
      const version = h.readUInt32BE(4);
      if (version !== MULTIFD_VERSION) this.fail(at + 4, `multifd packet version ${version} is not supported (only ${MULTIFD_VERSION})`);
      const flags = h.readUInt32BE(8);
      const method = (flags & MultifdFlag.COMPRESSION_MASK) >> 1;
      if (method !== 0) this.fail(at + 8, `multifd-compression ${COMPRESSION_NAMES[method] ?? `method ${method}`} is not supported (set multifd-compression none)`);
      if ((flags & ~(MultifdFlag.SYNC | MultifdFlag.COMPRESSION_MASK)) !== 0) this.fail(at + 8, `unknown multifd packet flags 0x${flags.toString(16)}`);
      const normalCount = h.readUInt32BE(16);
      const zeroCount = h.readUInt32BE(32);
      if (normalCount + zeroCount > this.slots) {
        this.fail(at + 16, `packet lists ${normalCount} data and ${zeroCount} zero pages, more than the ${this.slots} a packet holds`);
      }
      const dataLength = normalCount * this.pageSize;
      if (this.buffered < this.packetHeaderSize + dataLength) return;
      const header = this.take(this.packetHeaderSize);
      const data = dataLength > 0 ? this.take(dataLength) : EMPTY;
      const packetNum = u64(header, 24);
      const nameEnd = header.indexOf(0, 64);
      if (nameEnd < 0 || nameEnd >= MULTIFD_HEADER_SIZE) this.fail(at + 64, 'RAM block name is not NUL-terminated');
      const block = header.toString('latin1', 64, nameEnd);
      const sync = (flags & MultifdFlag.SYNC) !== 0;
      const normal: number[] = new Array(normalCount);
      const zero: number[] = new Array(zeroCount);
      if (normalCount + zeroCount > 0) {
        const length = this.blockLength(block);
        if (length === undefined) this.fail(at + 64, `RAM block "${block.replace(/[^\x20-\x7e]/g, '?')}" was never announced by the main stream`);
        for (let i = 0; i < normalCount + zeroCount; i++) {
          const off = u64(header, MULTIFD_HEADER_SIZE + 8 * i);
          if (off % this.pageSize !== 0 || off + this.pageSize > length) {
            this.fail(at + MULTIFD_HEADER_SIZE + 8 * i, `page offset 0x${off.toString(16)} is ${off % this.pageSize !== 0 ? 'not page-aligned' : `past the end of block "${block}" (length 0x${length.toString(16)})`}`);
          }
          if (i < normalCount) normal[i] = off;
          else zero[i - normalCount] = off;
        }
      }
      this.push({ type: 'multifd-packet', offset: at, channel: this.channel, packetNum, epoch: this.epoch, sync, block, normal, zero, data });
      if (sync) this.epoch++;
    }
  }
}

const EMPTY = Buffer.alloc(0);
