import { Qcow2Error } from './errors';

/** "QFI\xfb" */
export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** What we write: the v3 fields, the compression_type byte and its padding. */
export const V3_HEADER_LENGTH = 112;
/** QEMU's limits (block/qcow2.h): 512 B .. 2 MiB clusters. */
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU refuses an active L1 table larger than 32 MiB. */
export const MAX_L1_ENTRIES = (32 * 1024 * 1024) / 8;

const INCOMPAT_DIRTY = 1;
const INCOMPAT_CORRUPT = 2;
const INCOMPAT_DATA_FILE = 4;
const INCOMPAT_COMPRESSION = 8;
const INCOMPAT_EXTL2 = 16;
const INCOMPAT_KNOWN = 0x1f;

export interface Qcow2Header {
  version: number;
  clusterBits: number;
  virtualSize: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  compatibleLow: number;
  autoclearLow: number;
  autoclearHigh: number;
  refcountOrder: number;
  headerLength: number;
}

function u64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 4294967296 + buf.readUInt32BE(at + 4);
}

function putU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / 4294967296) >>> 0, at);
  buf.writeUInt32BE(value % 4294967296 >>> 0, at + 4);
}

function hex(n: number): string {
  return '0x' + n.toString(16);
}

/**
 * Validate a header (the first bytes of the file) and return its fields.
 * Every image this engine cannot read or write faithfully is refused here,
 * with the reason, rather than misread later.
 */
export function parseHeader(path: string, buf: Buffer, fileSize: number): Qcow2Header {
  if (buf.length < 4 || buf.readUInt32BE(0) !== QCOW2_MAGIC) {
    const got = buf.length >= 4 ? hex(buf.readUInt32BE(0)) : `only ${buf.length} bytes`;
    throw new Qcow2Error(path, `not a qcow2 image: bad magic (${got}, expected 0x514649fb)`, 0);
  }
  if (buf.length < 8) throw new Qcow2Error(path, `file too short for a qcow2 header: ${fileSize} bytes`);
  const version = buf.readUInt32BE(4);
  if (version === 2) throw new Qcow2Error(path, 'qcow2 version 2 images are not supported (need version 3; convert with qemu-img amend -o compat=1.1)', 4);
  if (version !== 3) throw new Qcow2Error(path, `unsupported qcow2 version ${version}`, 4);
  if (buf.length < V3_MIN_HEADER_LENGTH) {
    throw new Qcow2Error(path, `file too short for a qcow2 version 3 header: ${fileSize} bytes, need ${V3_MIN_HEADER_LENGTH}`);
  }
  const headerLength = buf.readUInt32BE(100);
  if (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0) {
    throw new Qcow2Error(path, `invalid header_length ${headerLength} (must be >= 104 and a multiple of 8)`, 100);
  }
  if (buf.length < headerLength) {
    throw new Qcow2Error(path, `file too short for its header: ${fileSize} bytes, header_length ${headerLength}`);
  }

  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new Qcow2Error(path, `cluster size out of range: cluster_bits ${clusterBits} (supported ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS})`, 20);
  }
  const clusterSize = 2 ** clusterBits;
  if (headerLength > clusterSize) {
    throw new Qcow2Error(path, `header_length ${headerLength} exceeds the cluster size ${clusterSize}`, 100);
  }

  const backingOffset = u64(buf, 8);
  if (backingOffset !== 0) throw new Qcow2Error(path, 'image has a backing file, which is not supported', 8);
  const crypt = buf.readUInt32BE(32);
  if (crypt !== 0) {
    const name = crypt === 1 ? 'AES' : crypt === 2 ? 'LUKS' : `method ${crypt}`;
    throw new Qcow2Error(path, `image is encrypted (${name}), which is not supported`, 32);
  }

  // Only bits 0-4 are defined; the high word has none.
  const incompatHigh = buf.readUInt32BE(72);
  const incompat = buf.readUInt32BE(76);
  if (incompatHigh !== 0 || (incompat & ~INCOMPAT_KNOWN) !== 0) {
    throw new Qcow2Error(path, `unknown incompatible feature bits set: ${hex(incompatHigh)}_${incompat.toString(16).padStart(8, '0')}`, 72);
  }
  if (incompat & INCOMPAT_DIRTY) {
    throw new Qcow2Error(path, 'image is marked dirty (refcounts may be stale); it needs qemu-img check -r all', 72);
  }
  if (incompat & INCOMPAT_CORRUPT) throw new Qcow2Error(path, 'image is marked corrupt; repair it with qemu-img check -r all', 72);
  if (incompat & INCOMPAT_DATA_FILE) throw new Qcow2Error(path, 'image uses an external data file, which is not supported', 72);
  if (incompat & INCOMPAT_EXTL2) throw new Qcow2Error(path, 'image uses extended L2 entries (subclusters), which are not supported', 72);
  const compressionType = headerLength > 104 ? buf[104] : 0;
  if ((incompat & INCOMPAT_COMPRESSION) || compressionType !== 0) {
    const name = compressionType === 1 ? 'zstd' : `type ${compressionType}`;
    throw new Qcow2Error(path, `compression ${name} is not supported (only deflate/zlib)`, 104);
  }

  const refcountOrder = buf.readUInt32BE(96);
  if (refcountOrder > 6) throw new Qcow2Error(path, `invalid refcount_order ${refcountOrder} (max 6)`, 96);

  const virtualSize = u64(buf, 24);
  if (!Number.isSafeInteger(virtualSize)) throw new Qcow2Error(path, `virtual size too large: ${virtualSize}`, 24);
  const l1Size = buf.readUInt32BE(36);
  const l1TableOffset = u64(buf, 40);
  const refcountTableOffset = u64(buf, 48);
  const refcountTableClusters = buf.readUInt32BE(56);

  if (l1Size > MAX_L1_ENTRIES) throw new Qcow2Error(path, `L1 table too large: ${l1Size} entries`, 36);
  const l2Covers = clusterSize * (clusterSize / 8);
  const vmStateIndex = Math.ceil(virtualSize / l2Covers);
  if (l1Size < vmStateIndex) {
    throw new Qcow2Error(path, `L1 table too small: ${l1Size} entries for a virtual size of ${virtualSize} bytes`, 36);
  }
  if (l1TableOffset % clusterSize !== 0) throw new Qcow2Error(path, `L1 table offset ${hex(l1TableOffset)} is not cluster aligned`, 40);
  if (l1Size > 0 && (l1TableOffset === 0 || l1TableOffset + l1Size * 8 > fileSize)) {
    throw new Qcow2Error(path, `L1 table (${l1Size} entries at ${hex(l1TableOffset)}) lies outside the file (${fileSize} bytes)`, 40);
  }
  if (refcountTableOffset % clusterSize !== 0) {
    throw new Qcow2Error(path, `refcount table offset ${hex(refcountTableOffset)} is not cluster aligned`, 48);
  }
  if (refcountTableClusters === 0) throw new Qcow2Error(path, 'refcount table has zero clusters', 56);
  if (refcountTableOffset === 0 || refcountTableOffset >= fileSize) {
    throw new Qcow2Error(path, `refcount table offset ${hex(refcountTableOffset)} lies outside the file (${fileSize} bytes)`, 48);
  }
  // QEMU's limit: an 8 MiB refcount table.
  if (refcountTableClusters * clusterSize > 8 * 1024 * 1024) {
    throw new Qcow2Error(path, `refcount table too large: ${refcountTableClusters} clusters`, 56);
  }

  return {
    version,
    clusterBits,
    virtualSize,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(buf, 64),
    compatibleLow: buf.readUInt32BE(84),
    autoclearHigh: buf.readUInt32BE(88),
    autoclearLow: buf.readUInt32BE(92),
    refcountOrder,
    headerLength,
  };
}

/**
 * A fresh version 3 header: no features, deflate compression, no snapshots,
 * followed by the end-of-extensions marker (8 zero bytes).
 */
export function buildHeader(fields: {
  clusterBits: number;
  virtualSize: number;
  refcountOrder: number;
}): Buffer {
  const buf = Buffer.alloc(V3_HEADER_LENGTH + 8);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(3, 4);
  buf.writeUInt32BE(fields.clusterBits, 20);
  putU64(buf, 24, fields.virtualSize);
  buf.writeUInt32BE(fields.refcountOrder, 96);
  buf.writeUInt32BE(V3_HEADER_LENGTH, 100);
  return buf;
}

/** Rewrite the fields that change while an image is written. */
export function patchHeader(
  buf: Buffer,
  fields: { l1Size: number; l1TableOffset: number; refcountTableOffset: number; refcountTableClusters: number },
): void {
  buf.writeUInt32BE(fields.l1Size, 36);
  putU64(buf, 40, fields.l1TableOffset);
  putU64(buf, 48, fields.refcountTableOffset);
  buf.writeUInt32BE(fields.refcountTableClusters, 56);
}

/** We do not maintain bitmaps (or any other auto-clear feature): clear them before writing. */
export function clearAutoclear(buf: Buffer): void {
  buf.writeUInt32BE(0, 88);
  buf.writeUInt32BE(0, 92);
}
