import { readSync } from 'fs';
import type { FileHandle } from 'fs/promises';
import { Qcow2Error } from './errors';

/** Read entry `i` of a refcount block whose entries are 2^order bits wide. */
function getEntry(block: Buffer, i: number, order: number): number {
  switch (order) {
    case 4:
      return block.readUInt16BE(i * 2);
    case 3:
      return block[i];
    case 5:
      return block.readUInt32BE(i * 4);
    case 6:
      return block.readUInt32BE(i * 8) * 4294967296 + block.readUInt32BE(i * 8 + 4);
    default: {
      // Sub-byte widths: entry 0 sits in the least significant bits.
      const bits = 1 << order;
      const perByte = 8 >> order;
      const shift = (i % perByte) * bits;
      return (block[Math.floor(i / perByte)] >> shift) & ((1 << bits) - 1);
    }
  }
}

/**
 * Non-zero entries of a refcount block and the index of the last one (-1
 * if none). Whole-byte widths are scanned as typed-array words, whose
 * zero-ness does not depend on byte order: opening a 1 GiB image went from
 * ~10 ms of getEntry() calls to well under one.
 */
function countNonZero(block: Buffer, order: number, entries: number): [number, number] {
  let used = 0;
  let last = -1;
  if (order >= 3 && order <= 5) {
    const words =
      order === 3
        ? new Uint8Array(block.buffer, block.byteOffset, entries)
        : order === 4
          ? new Uint16Array(block.buffer, block.byteOffset, entries)
          : new Uint32Array(block.buffer, block.byteOffset, entries);
    for (let j = 0; j < entries; j++) {
      if (words[j] !== 0) {
        used++;
        last = j;
      }
    }
    return [used, last];
  }
  for (let j = 0; j < entries; j++) {
    if (getEntry(block, j, order) !== 0) {
      used++;
      last = j;
    }
  }
  return [used, last];
}

function setEntry(block: Buffer, i: number, order: number, v: number): void {
  switch (order) {
    case 4:
      block.writeUInt16BE(v, i * 2);
      return;
    case 3:
      block[i] = v;
      return;
    case 5:
      block.writeUInt32BE(v, i * 4);
      return;
    case 6:
      block.writeUInt32BE(Math.floor(v / 4294967296) >>> 0, i * 8);
      block.writeUInt32BE(v % 4294967296 >>> 0, i * 8 + 4);
      return;
    default: {
      const bits = 1 << order;
      const perByte = 8 >> order;
      const shift = (i % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      const at = Math.floor(i / perByte);
      block[at] = (block[at] & ~mask) | ((v << shift) & mask);
    }
  }
}

function readOffset(table: Buffer, i: number): number {
  return (table.readUInt32BE(i * 8) & 0x00ffffff) * 4294967296 + ((table.readUInt32BE(i * 8 + 4) & 0xfffffe00) >>> 0);
}

function writeOffset(table: Buffer, i: number, offset: number): void {
  table.writeUInt32BE(Math.floor(offset / 4294967296) >>> 0, i * 8);
  table.writeUInt32BE(offset % 4294967296 >>> 0, i * 8 + 4);
}

/**
 * Host cluster bookkeeping: the refcount table and all refcount blocks live
 * in memory, so that allocating is a synchronous decision. Space is only
 * ever taken from the end of the file (nextFree), never reused, which keeps
 * fresh clusters as holes that read back as zeros.
 */
export class RefcountManager {
  readonly path: string;
  readonly clusterSize: number;
  readonly order: number;
  private readonly perBlock: number;
  private readonly maxRefcount: number;
  private table: Buffer;
  private blocks = new Map<number, Buffer>();
  private dirtyBlocks = new Set<number>();
  private tableDirty = false;
  tableOffset: number;
  tableClusters: number;
  /** First cluster index past everything allocated: the next allocation. */
  nextFree: number;
  /** Clusters whose refcount is non-zero. */
  usedClusters = 0;

  constructor(path: string, clusterSize: number, order: number, tableOffset: number, tableClusters: number, table?: Buffer) {
    this.path = path;
    this.clusterSize = clusterSize;
    this.order = order;
    this.perBlock = (clusterSize * 8) >> order;
    this.maxRefcount = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.table = table ?? Buffer.alloc(tableClusters * clusterSize);
    this.nextFree = 0;
  }

  /** A fresh image: table at `tableOffset`, header cluster 0 and the table itself counted. */
  static createFresh(path: string, clusterSize: number, order: number): RefcountManager {
    const m = new RefcountManager(path, clusterSize, order, clusterSize, 1);
    m.tableDirty = true;
    m.nextFree = 2;
    m.increment(0);
    m.increment(1);
    return m;
  }

  /** Load the table and every refcount block of an existing image. */
  static async load(
    path: string,
    fh: FileHandle,
    fileSize: number,
    clusterSize: number,
    order: number,
    tableOffset: number,
    tableClusters: number,
    readOnly = false,
  ): Promise<RefcountManager> {
    const table = Buffer.alloc(tableClusters * clusterSize);
    await readFully(fh, table, tableOffset);
    const m = new RefcountManager(path, clusterSize, order, tableOffset, tableClusters, table);
    m.fileSize = fileSize;
    // A reader needs no refcounts: a sparse file can name gigabytes of
    // blocks that would all be read and held here for nothing.
    if (readOnly) return m;
    const entries = table.length / 8;
    let highestUsed = -1;
    // Distinct blocks inside the file cost at most the file's size in memory;
    // a table naming one block a million times would cost a million clusters.
    const seen = new Map<number, number>();
    for (let i = 0; i < entries; i++) {
      const raw = table.readUInt32BE(i * 8) * 4294967296 + table.readUInt32BE(i * 8 + 4);
      if (raw === 0) continue;
      const off = readOffset(table, i);
      if (off % clusterSize !== 0 || raw % 512 !== 0) {
        throw new Qcow2Error(path, `refcount block ${i} offset 0x${raw.toString(16)} is not cluster aligned`, tableOffset + i * 8);
      }
      if (off >= fileSize) {
        throw new Qcow2Error(path, `refcount block ${i} at 0x${off.toString(16)} lies outside the file (${fileSize} bytes)`, tableOffset + i * 8);
      }
      const first = seen.get(off);
      if (first !== undefined) {
        throw new Qcow2Error(path, `refcount block ${i} at 0x${off.toString(16)} is the same cluster as refcount block ${first}`, tableOffset + i * 8);
      }
      seen.set(off, i);
      const block = Buffer.alloc(clusterSize);
      await readFully(fh, block, off);
      m.blocks.set(i, block);
      const [used, last] = countNonZero(block, order, m.perBlock);
      m.usedClusters += used;
      if (last >= 0) highestUsed = i * m.perBlock + last;
    }
    m.nextFree = Math.max(highestUsed + 1, Math.ceil(fileSize / clusterSize));
    return m;
  }

  /**
   * Clusters with a non-zero refcount, counted from the file one block at a
   * time in a reused buffer (for a read-only open, which loads no blocks).
   * Checks the table as load() does.
   */
  countUsedSync(fd: number): number {
    if (this.counted !== null) return this.counted;
    const entries = this.table.length / 8;
    const offsets = new Float64Array(entries);
    let n = 0;
    for (let i = 0; i < entries; i++) {
      const raw = this.table.readUInt32BE(i * 8) * 4294967296 + this.table.readUInt32BE(i * 8 + 4);
      if (raw === 0) continue;
      const off = readOffset(this.table, i);
      if (off % this.clusterSize !== 0 || raw % 512 !== 0) {
        throw new Qcow2Error(this.path, `refcount block ${i} offset 0x${raw.toString(16)} is not cluster aligned`, this.tableOffset + i * 8);
      }
      if (off >= this.fileSize) {
        throw new Qcow2Error(this.path, `refcount block ${i} at 0x${off.toString(16)} lies outside the file (${this.fileSize} bytes)`, this.tableOffset + i * 8);
      }
      offsets[n++] = off;
    }
    // Each distinct block once: a table naming one block a million times must not cost a million reads.
    const sorted = offsets.slice(0, n).sort();
    for (let k = 1; k < n; k++) {
      if (sorted[k] === sorted[k - 1]) {
        const dup = sorted[k];
        let first = -1;
        for (let i = 0; i < entries; i++) {
          if (this.table.readUInt32BE(i * 8 + 4) === 0 && this.table.readUInt32BE(i * 8) === 0) continue;
          if (readOffset(this.table, i) !== dup) continue;
          if (first < 0) first = i;
          else throw new Qcow2Error(this.path, `refcount block ${i} at 0x${dup.toString(16)} is the same cluster as refcount block ${first}`, this.tableOffset + i * 8);
        }
      }
    }
    const block = Buffer.alloc(this.clusterSize);
    let used = 0;
    for (let i = 0; i < entries; i++) {
      const raw = this.table.readUInt32BE(i * 8) * 4294967296 + this.table.readUInt32BE(i * 8 + 4);
      if (raw === 0) continue;
      const off = readOffset(this.table, i);
      let done = 0;
      while (done < block.length) {
        const r = readSync(fd, block, done, block.length - done, off + done);
        if (r === 0) {
          block.fill(0, done);
          break;
        }
        done += r;
      }
      used += countNonZero(block, this.order, this.perBlock)[0];
    }
    this.counted = used;
    return used;
  }

  /** countUsedSync's result, once counted. */
  private counted: number | null = null;
  private fileSize = 0;

  get(cluster: number): number {
    const block = this.blocks.get(Math.floor(cluster / this.perBlock));
    return block ? getEntry(block, cluster % this.perBlock, this.order) : 0;
  }

  /** Reserve `n` contiguous clusters at the end of the file; returns the byte offset. */
  allocate(n: number): number {
    const first = this.nextFree;
    this.nextFree += n;
    for (let c = first; c < first + n; c++) this.increment(c);
    return first * this.clusterSize;
  }

  increment(cluster: number): void {
    const bi = Math.floor(cluster / this.perBlock);
    const block = this.blockFor(bi);
    const i = cluster % this.perBlock;
    const v = getEntry(block, i, this.order);
    if (v >= this.maxRefcount) {
      throw new Qcow2Error(this.path, `refcount overflow for host cluster ${cluster}`);
    }
    setEntry(block, i, this.order, v + 1);
    this.dirtyBlocks.add(bi);
    if (v === 0) this.usedClusters++;
  }

  decrement(cluster: number): void {
    const bi = Math.floor(cluster / this.perBlock);
    const block = this.blocks.get(bi);
    const i = cluster % this.perBlock;
    const v = block ? getEntry(block, i, this.order) : 0;
    if (!block || v === 0) {
      throw new Qcow2Error(this.path, `refcount of host cluster ${cluster} would drop below zero (metadata is inconsistent)`, cluster * this.clusterSize);
    }
    setEntry(block, i, this.order, v - 1);
    this.dirtyBlocks.add(bi);
    if (v === 1) this.usedClusters--;
  }

  /** Decrement every cluster overlapping the byte range (as QEMU frees compressed data). */
  releaseRange(offset: number, length: number): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.decrement(c);
  }

  private blockFor(bi: number): Buffer {
    let block = this.blocks.get(bi);
    if (block) return block;
    if (bi >= this.table.length / 8) {
      this.growTable(bi + 1);
      // Counting the new table's clusters may already have created this very block.
      block = this.blocks.get(bi);
      if (block) return block;
    }
    // Register the block before counting it: its own refcount may live in it.
    const bc = this.nextFree++;
    block = Buffer.alloc(this.clusterSize);
    this.blocks.set(bi, block);
    this.dirtyBlocks.add(bi);
    writeOffset(this.table, bi, bc * this.clusterSize);
    this.tableDirty = true;
    this.increment(bc);
    return block;
  }

  private growTable(minEntries: number): void {
    const needed = Math.ceil((minEntries * 8) / this.clusterSize);
    const clusters = Math.max(needed, this.tableClusters * 2);
    const first = this.nextFree;
    this.nextFree += clusters;
    const table = Buffer.alloc(clusters * this.clusterSize);
    this.table.copy(table);
    const oldFirst = this.tableOffset / this.clusterSize;
    const oldClusters = this.tableClusters;
    this.table = table;
    this.tableOffset = first * this.clusterSize;
    this.tableClusters = clusters;
    this.tableDirty = true;
    // The new table is big enough for any block these increments create.
    for (let c = first; c < first + clusters; c++) this.increment(c);
    for (let c = oldFirst; c < oldFirst + oldClusters; c++) this.decrement(c);
  }

  /** Write dirty refcount blocks and, if it changed, the table. */
  async flush(fh: FileHandle): Promise<void> {
    const writes: Promise<unknown>[] = [];
    for (const bi of this.dirtyBlocks) {
      const block = this.blocks.get(bi) as Buffer;
      writes.push(fh.write(block, 0, block.length, readOffset(this.table, bi)));
    }
    this.dirtyBlocks.clear();
    if (this.tableDirty) {
      writes.push(fh.write(this.table, 0, this.table.length, this.tableOffset));
      this.tableDirty = false;
    }
    await Promise.all(writes);
  }
}

/** Positional read that zero-fills whatever lies past the end of the file. */
export async function readFully(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) {
      buf.fill(0, done);
      return;
    }
    done += bytesRead;
  }
}
