import type { FileHandle } from 'fs/promises';
import { Qcow2Error } from './errors';
import { readFully } from './refcount';
import type { RefcountManager } from './refcount';

export const TWO32 = 4294967296;
export const FLAG_COPIED = 0x80000000;
export const FLAG_COMPRESSED = 0x40000000;
const MIB = 1024 * 1024;
/**
 * Clean L2 tables beyond this are evicted; images whose whole L2 set fits are
 * mapped completely at open so that allocatedRanges() can answer at once.
 */
const L2_CACHE_BYTES = 64 * MIB;

/** Points L2 entry j at a standard cluster, COPIED. */
export function setL2(table: Buffer, j: number, hostOffset: number): void {
  table.writeUInt32BE((FLAG_COPIED | Math.floor(hostOffset / TWO32)) >>> 0, j * 8);
  table.writeUInt32BE(hostOffset % TWO32 >>> 0, j * 8 + 4);
}

export interface L2CacheState {
  path: string;
  fh: FileHandle;
  clusterSize: number;
  refs: RefcountManager;
  l1: Buffer;
  l1Size: number;
  l1Offset: number;
}

/**
 * The active L1 table and the L2 tables in memory: loaded on demand (or all
 * at open when they fit), dirty ones pinned until flush() writes them,
 * clean ones evicted past L2_CACHE_BYTES. New tables and a grown L1 are
 * allocated here.
 */
export class L2Cache {
  readonly path: string;
  readonly fh: FileHandle;
  readonly clusterSize: number;
  readonly l2Entries: number;
  private readonly refs: RefcountManager;
  l1: Buffer;
  l1Size: number;
  l1Offset: number;
  l1Dirty = false;
  /** L2 tables in memory, by L1 index. */
  readonly tables = new Map<number, Buffer>();
  /** L1 indexes of the tables flush() must write. */
  readonly dirty = new Set<number>();
  private readonly loading = new Map<number, Promise<void>>();

  constructor(s: L2CacheState) {
    this.path = s.path;
    this.fh = s.fh;
    this.clusterSize = s.clusterSize;
    this.l2Entries = s.clusterSize / 8;
    this.refs = s.refs;
    this.l1 = s.l1;
    this.l1Size = s.l1Size;
    this.l1Offset = s.l1Offset;
  }

  tableOffset(l1i: number): number {
    if (l1i >= this.l1Size) return 0;
    return (this.l1.readUInt32BE(l1i * 8) & 0x00ffffff) * TWO32 + ((this.l1.readUInt32BE(l1i * 8 + 4) & 0xfffffe00) >>> 0);
  }

  private setL1(l1i: number, hostOffset: number): void {
    this.l1.writeUInt32BE((FLAG_COPIED | Math.floor(hostOffset / TWO32)) >>> 0, l1i * 8);
    this.l1.writeUInt32BE(hostOffset % TWO32 >>> 0, l1i * 8 + 4);
    this.l1Dirty = true;
  }

  /** Promise for loading the missing L2 tables of L1 range [first, last], or null if all are here. */
  loadTables(first: number, last: number): Promise<unknown> | null {
    let pending: Promise<void>[] | null = null;
    for (let l1i = first; l1i <= last && l1i < this.l1Size; l1i++) {
      if (this.tables.has(l1i) || this.tableOffset(l1i) === 0) continue;
      (pending ??= []).push(this.loadTable(l1i));
    }
    return pending ? Promise.all(pending) : null;
  }

  private loadTable(l1i: number): Promise<void> {
    const existing = this.loading.get(l1i);
    if (existing) return existing;
    const off = this.tableOffset(l1i);
    const p = (async () => {
      const table = Buffer.allocUnsafe(this.clusterSize);
      await readFully(this.fh, table, off);
      if (!this.tables.has(l1i)) {
        this.tables.set(l1i, table);
        this.evictClean();
      }
    })();
    this.loading.set(l1i, p);
    const done = (): void => {
      this.loading.delete(l1i);
    };
    p.then(done, done);
    return p;
  }

  private evictClean(): void {
    const limit = Math.max(4, Math.floor(L2_CACHE_BYTES / this.clusterSize));
    if (this.tables.size <= limit) return;
    for (const key of this.tables.keys()) {
      if (this.tables.size <= limit) break;
      if (!this.dirty.has(key)) this.tables.delete(key);
    }
  }

  async preloadIfSmall(): Promise<void> {
    const offsets: Array<[number, number]> = [];
    for (let i = 0; i < this.l1Size; i++) {
      const off = this.tableOffset(i);
      if (off !== 0) offsets.push([off, i]);
    }
    if (offsets.length * this.clusterSize > L2_CACHE_BYTES) return;
    offsets.sort((a, b) => a[0] - b[0]);
    // Coalesce tables that sit next to each other on disk into one read.
    let k = 0;
    while (k < offsets.length) {
      let n = 1;
      while (k + n < offsets.length && offsets[k + n][0] === offsets[k][0] + n * this.clusterSize && n < 64) n++;
      const buf = Buffer.alloc(n * this.clusterSize);
      await readFully(this.fh, buf, offsets[k][0]);
      for (let m = 0; m < n; m++) {
        this.tables.set(offsets[k + m][1], buf.subarray(m * this.clusterSize, (m + 1) * this.clusterSize));
      }
      k += n;
    }
  }

  /** Grow the active L1 table so that index `l1i` exists (VM state lies past the disk). */
  growL1(l1i: number): void {
    const size = l1i + 1;
    if (size * 8 > this.l1.length) {
      const cs = this.clusterSize;
      const clusters = Math.ceil((size * 8) / cs);
      const offset = this.refs.allocate(clusters);
      const l1 = Buffer.alloc(clusters * cs);
      this.l1.copy(l1, 0, 0, this.l1Size * 8);
      const oldClusters = Math.ceil((this.l1Size * 8) / cs);
      for (let c = 0; c < oldClusters; c++) this.refs.decrement(this.l1Offset / cs + c);
      this.l1 = l1;
      this.l1Offset = offset;
    }
    this.l1Size = size;
    this.l1Dirty = true;
  }

  /** Host offset of a standard entry, validated. */
  standardOffset(hi: number, lo: number, l1i: number, j: number): number {
    const host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (host % this.clusterSize !== 0) {
      throw new Qcow2Error(this.path, `L2 entry ${j} of table ${l1i}: data cluster offset 0x${host.toString(16)} is not cluster aligned`, this.tableOffset(l1i) + j * 8);
    }
    return host;
  }

  tableForWrite(l1i: number): Buffer {
    const off = this.tableOffset(l1i);
    if (off === 0) {
      const table = Buffer.alloc(this.clusterSize);
      this.setL1(l1i, this.refs.allocate(1));
      this.tables.set(l1i, table);
      this.dirty.add(l1i);
      return table;
    }
    if ((this.l1.readUInt32BE(l1i * 8) & FLAG_COPIED) === 0) {
      throw new Qcow2Error(this.path, `L2 table ${l1i} is shared (no COPIED flag); writing to it is not supported`, this.l1Offset + l1i * 8);
    }
    return this.tables.get(l1i) as Buffer;
  }
}
