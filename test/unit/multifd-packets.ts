// Hand-built multifd channel bytes, shaped like QEMU 7.2's and 10.0's
// (src/migration/multifd.ts describes the layout).
import { MULTIFD_MAGIC, MULTIFD_HEADER_SIZE, MultifdChannelParser, MultifdRecord } from '../../src/migration/multifd';

export const PAGE = 4096;
const SLOTS = (512 * 1024) / PAGE;

export function init(channel: number): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(1, 4);
  b[24] = channel;
  return b;
}

export interface PacketSpec {
  flags?: number;
  block?: string;
  normal?: number[];
  zero?: number[];
  num?: number;
  /** What 7.2 leaves in next_packet_size of a SYNC packet. */
  next?: number;
  alloc?: number;
  magic?: number;
  version?: number;
  /** Byte every data page is filled with (default: its page number's low byte). */
  fill?: number;
}

export function packet(p: PacketSpec): Buffer {
  const normal = p.normal ?? [];
  const zero = p.zero ?? [];
  const h = Buffer.alloc(MULTIFD_HEADER_SIZE + 8 * SLOTS);
  h.writeUInt32BE(p.magic ?? MULTIFD_MAGIC, 0);
  h.writeUInt32BE(p.version ?? 1, 4);
  h.writeUInt32BE(p.flags ?? 0, 8);
  h.writeUInt32BE(p.alloc ?? SLOTS, 12);
  h.writeUInt32BE(normal.length, 16);
  h.writeUInt32BE(p.next ?? normal.length * PAGE, 20);
  h.writeBigUInt64BE(BigInt(p.num ?? 0), 24);
  h.writeUInt32BE(zero.length, 32);
  h.write(p.block ?? '', 64, 'latin1');
  [...normal, ...zero].forEach((off, i) => h.writeBigUInt64BE(BigInt(off), MULTIFD_HEADER_SIZE + 8 * i));
  const data = Buffer.alloc(normal.length * PAGE);
  normal.forEach((off, i) => data.fill(p.fill ?? (off / PAGE) & 0xff, i * PAGE, (i + 1) * PAGE));
  return Buffer.concat([h, data]);
}


/** Parses one channel's bytes (in `cut`-byte writes when cut > 0) with blocks of the given lengths. */
export async function parseChannel(bytes: Buffer, blocks: Record<string, number>, cut = 0, pageSize = PAGE): Promise<MultifdRecord[]> {
  const p = new MultifdChannelParser({ pageSize, blockLength: (id) => blocks[id] });
  const out: MultifdRecord[] = [];
  const done = new Promise<void>((resolve, reject) => {
    p.on('data', (r: unknown) => out.push(r as MultifdRecord));
    p.on('end', resolve);
    p.on('error', reject);
  });
  if (cut > 0) for (let i = 0; i < bytes.length; i += cut) p.write(bytes.subarray(i, i + cut));
  else p.write(bytes);
  p.end(null);
  await done;
  return out;
}
