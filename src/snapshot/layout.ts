// The snapshot image layout shared by save and load: where RAM blocks live on
// the virtual disk, and the STVM header at the start of the VM state area.
//
// VM state area (QCOW2's vmstate region, past the virtual disk):
//   [0, 28)                      STVM header
//   [28, 28 + leaderLength)      leader: QEVM header, configuration, ram START
//                                section with the block list (commands removed)
//   [28 + leaderLength, 28 + stateLength)
//                                device state, verbatim (up to and including
//                                EOF and VMDESCRIPTION)
//   [28 + stateLength, ...)      qemu-snap extensions (versioned, optional)
import { QemuSnapError } from '../errors';

export const STVM_MAGIC = 0x5354564d; // "STVM"
export const VMSTATE_HEADER_SIZE = 28;
/** RAM blocks start at multiples of this on the virtual disk. */
export const BLOCK_ALIGNMENT = 1 << 20;

export class SnapshotFormatError extends QemuSnapError {
  constructor(readonly path: string, message: string) {
    super(`${path}: ${message}`);
  }
}

export interface SnapshotHeader {
  pageSize: number;
  /** Distinct pages holding data in the image. */
  dataPages: number;
  /** Offset, inside the leader, of the section that carries MEM_SIZE. */
  ramSectionOffset: number;
  leaderLength: number;
  /** Leader plus device state. */
  stateLength: number;
}

export function encodeSnapshotHeader(h: SnapshotHeader): Buffer {
  const b = Buffer.alloc(VMSTATE_HEADER_SIZE);
  b.writeUInt32BE(STVM_MAGIC, 0);
  b.writeUInt32BE(h.pageSize, 4);
  b.writeBigUInt64BE(BigInt(h.dataPages), 8);
  b.writeUInt32BE(h.ramSectionOffset, 16);
  b.writeUInt32BE(h.leaderLength, 20);
  b.writeUInt32BE(h.stateLength, 24);
  return b;
}

/**
 * Decodes and checks an STVM header. `areaLimit` is the number of bytes the
 * VM state area can hold at most (so offsets that cannot fit are refused
 * before anything is read through them).
 */
export function decodeSnapshotHeader(path: string, b: Buffer, areaLimit: number): SnapshotHeader {
  if (b.length < VMSTATE_HEADER_SIZE) throw new SnapshotFormatError(path, 'VM state area too short for the STVM header');
  const magic = b.readUInt32BE(0);
  if (magic !== STVM_MAGIC) {
    throw new SnapshotFormatError(path, `no qemu-snap STVM header in the VM state area (magic 0x${magic.toString(16).padStart(8, '0')}): not a qemu-snap snapshot`);
  }
  const pageSize = b.readUInt32BE(4);
  if (!isValidPageSize(pageSize)) throw new SnapshotFormatError(path, `STVM header: bad page size ${pageSize}`);
  const dataPages = b.readBigUInt64BE(8);
  if (dataPages > BigInt(Number.MAX_SAFE_INTEGER)) throw new SnapshotFormatError(path, `STVM header: absurd data page count ${dataPages}`);
  const ramSectionOffset = b.readUInt32BE(16);
  const leaderLength = b.readUInt32BE(20);
  const stateLength = b.readUInt32BE(24);
  if (leaderLength < 8 || ramSectionOffset >= leaderLength) {
    throw new SnapshotFormatError(path, `STVM header: ram section offset ${ramSectionOffset} is outside the leader (${leaderLength} bytes)`);
  }
  if (stateLength < leaderLength) {
    throw new SnapshotFormatError(path, `STVM header: state length ${stateLength} is shorter than the leader (${leaderLength} bytes)`);
  }
  if (VMSTATE_HEADER_SIZE + stateLength > areaLimit) {
    throw new SnapshotFormatError(path, `STVM header: state length ${stateLength} does not fit in the VM state area (${areaLimit} bytes)`);
  }
  return { pageSize, dataPages: Number(dataPages), ramSectionOffset, leaderLength, stateLength };
}

export function isValidPageSize(n: number): boolean {
  return Number.isInteger(n) && n >= 512 && n <= 65536 && (n & (n - 1)) === 0;
}

export interface RamBlockLayout {
  id: string;
  length: number;
  /** Offset of the block's first byte on the virtual disk. */
  offset: number;
}

/** Places blocks in MEM_SIZE order, each at the end of the previous rounded up to 1 MiB. */
export function layoutRamBlocks(blocks: ReadonlyArray<{ id: string; length: number }>): { blocks: RamBlockLayout[]; virtualSize: number } {
  let next = 0;
  const out: RamBlockLayout[] = [];
  for (const b of blocks) {
    out.push({ id: b.id, length: b.length, offset: next });
    next = alignUp(next + b.length, BLOCK_ALIGNMENT);
  }
  // An image needs some virtual size even for a stream without RAM.
  return { blocks: out, virtualSize: Math.max(next, BLOCK_ALIGNMENT) };
}

export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
