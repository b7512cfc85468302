import type { FileHandle } from 'fs/promises';
import { Qcow2Error } from './errors';
import { readFully } from './refcount';
import type { RefcountManager } from './refcount';
import { FLAG_COMPRESSED, FLAG_COPIED, setL2 } from './l2-cache';
import type { L2Cache } from './l2-cache';
import type { CompressedClusters } from './compressed';
import type { GuestDataFile } from './qcow2';
import type { NativeModule } from '../util/native';

/** Consumes a list of buffers as one byte sequence, handing out subarrays. */
export class BufferCursor {
  private index = 0;
  private offset = 0;

  constructor(private readonly buffers: Buffer[]) {}

  take(n: number, into: Buffer[]): void {
    while (n > 0) {
      const b = this.buffers[this.index];
      const avail = b.length - this.offset;
      if (avail === 0) {
        this.index++;
        this.offset = 0;
        continue;
      }
      const k = avail < n ? avail : n;
      into.push(k === b.length ? b : b.subarray(this.offset, this.offset + k));
      this.offset += k;
      n -= k;
    }
  }
}

export async function writeSlices(fh: FileHandle, slices: Buffer[], position: number, length: number): Promise<void> {
  const first =
    slices.length === 1 ? await fh.write(slices[0], 0, length, position) : await fh.writev(slices, position);
  let done = first.bytesWritten;
  // Short writes are rare on regular files; finish slice by slice.
  let skip = done;
  for (const s of slices) {
    if (skip >= s.length) {
      skip -= s.length;
      continue;
    }
    let at = skip;
    skip = 0;
    while (at < s.length) {
      const { bytesWritten } = await fh.write(s, at, s.length - at, position + done);
      if (bytesWritten === 0) throw new Error(`short write at host offset ${position + done}`);
      at += bytesWritten;
      done += bytesWritten;
    }
  }
}

/** A guest cluster whose partial write must copy its old content first, as planWrite() found it. */
export interface CowCluster {
  gci: number;
  table: Buffer;
  l1i: number;
  j: number;
  hi: number;
  lo: number;
  host: number;
  inCluster: number;
}

/** Where planWrite() sends the pieces of a guest write, in write order. */
export interface WriteSink {
  /** `length` bytes of the write, from byte `skip` of it on, go to host offset `host`. */
  run(host: number, skip: number, length: number): void;
  /** The `n` bytes from byte `skip` on land in a cluster that needs copy-on-write. Absent: such a write is declined. */
  copyOnWrite?(cluster: CowCluster, skip: number, n: number): void;
}

/**
 * Guest writes into the image: planWrite() decides where each byte goes
 * (allocating clusters and updating L2 entries), and its sinks issue the
 * writes: asynchronous positional writes, copy-on-write of partly written
 * shared or compressed clusters, or the native module's synchronous
 * pwriteSegments. `cow` holds the copy-on-writes running, by guest cluster:
 * the image's other I/O waits for them.
 */
export class WritePath {
  constructor(
    private readonly l2: L2Cache,
    private readonly refs: RefcountManager,
    private readonly compressed: CompressedClusters,
    private readonly cow: Map<number, Promise<void>>,
    private readonly virtualSize: number,
  ) {}

  /**
   * planWrite() for writes from buffers, asynchronous: contiguous host
   * ranges become one positional (v)write each (through the guest data
   * file when there is one). Null if an L2 table is missing.
   */
  planWriteTasks(dataFile: GuestDataFile | null, offset: number, buffers: Buffer[], length: number): Promise<void>[] | null {
    const cursor = new BufferCursor(buffers);
    const tasks: Promise<void>[] = [];
    const data = offset < this.virtualSize ? dataFile : null;
    const planned = this.planWrite(offset, length, {
      run: (host, _skip, n) => {
        const slices: Buffer[] = [];
        cursor.take(n, slices);
        tasks.push(data ? data.writev(host, slices, n) : writeSlices(this.l2.fh, slices, host, n));
      },
      copyOnWrite: (cluster, _skip, n) => {
        const slices: Buffer[] = [];
        cursor.take(n, slices);
        tasks.push(this.copyOnWrite(dataFile, cluster, slices));
      },
    });
    return planned === null ? null : tasks;
  }

  /**
   * planWrite() straight into the file with the native module's
   * pwriteSegments, on this thread (Qcow2Image.writeSegmentsSync). False,
   * having changed nothing, when a cluster of the range needs copy-on-write
   * or an L2 table is not in memory.
   */
  writeSegmentsSync(mod: NativeModule, offset: number, length: number, buffers: Buffer[], segments: Float64Array, count: number): boolean {
    const fd = this.l2.fh.fd;
    // No copyOnWrite in the sink: a write that needs one is declined before anything changes.
    const planned = this.planWrite(offset, length, {
      run: (host, skip, n) => {
        try {
          mod.pwriteSegments(fd, host, buffers, segments, count, skip, n);
        } catch (err) {
          throw new Qcow2Error(this.l2.path, `write of ${n} bytes failed: ${(err as Error).message}`, host);
        }
      },
    });
    return planned === true;
  }

  /**
   * The one write plan, for the asynchronous and the synchronous path:
   * decides where every byte of the guest range [offset, offset+length)
   * goes, allocating clusters and updating L2 entries as it goes, and
   * hands `sink` the host runs (contiguous host ranges merged) and the
   * clusters to copy-on-write, in write order. Null, having changed
   * nothing, if an L2 table of the range is not in memory; false, having
   * changed nothing, if a cluster needs copy-on-write and the sink takes none.
   */
  planWrite(offset: number, length: number, sink: WriteSink): boolean | null {
    const cs = this.l2.clusterSize;
    const l2Span = cs * this.l2.l2Entries;
    const end = offset + length;
    const lastL1 = Math.floor((end - 1) / l2Span);
    for (let l1i = Math.floor(offset / l2Span); l1i <= lastL1; l1i++) {
      if (this.l2.tableOffset(l1i) !== 0 && !this.l2.tables.has(l1i)) return null;
    }
    if (sink.copyOnWrite === undefined) {
      for (let pos = offset; pos < end; ) {
        const gci = Math.floor(pos / cs);
        const inCluster = pos - gci * cs;
        const n = Math.min(cs - inCluster, end - pos);
        pos += n;
        const l1i = Math.floor(gci / this.l2.l2Entries);
        const table = this.l2.tableOffset(l1i) === 0 ? undefined : this.l2.tables.get(l1i);
        if (table === undefined) continue; // a new table: holes only
        const j = gci - l1i * this.l2.l2Entries;
        const hi = table.readUInt32BE(j * 8);
        const lo = table.readUInt32BE(j * 8 + 4);
        const host = (hi & FLAG_COMPRESSED) !== 0 ? 0 : this.l2.standardOffset(hi, lo, l1i, j);
        if (this.needsCopyOnWrite(hi, lo, host, inCluster, n)) return false;
      }
    }
    if (lastL1 >= this.l2.l1Size) this.l2.growL1(lastL1);

    let runHost = -1;
    let runLen = 0;
    let runSkip = 0;
    const endRun = (): void => {
      if (runLen > 0) sink.run(runHost, runSkip, runLen);
      runLen = 0;
    };
    let pos = offset;
    while (pos < end) {
      const gci = Math.floor(pos / cs);
      const inCluster = pos - gci * cs;
      const n = Math.min(cs - inCluster, end - pos);
      const l1i = Math.floor(gci / this.l2.l2Entries);
      const j = gci - l1i * this.l2.l2Entries;
      const table = this.l2.tableForWrite(l1i);
      const hi = table.readUInt32BE(j * 8);
      const lo = table.readUInt32BE(j * 8 + 4);
      const host = (hi & FLAG_COMPRESSED) !== 0 ? 0 : this.l2.standardOffset(hi, lo, l1i, j);
      if (this.needsCopyOnWrite(hi, lo, host, inCluster, n)) {
        endRun();
        // Checked above when the sink takes no copy-on-write.
        (sink.copyOnWrite as NonNullable<WriteSink['copyOnWrite']>)({ gci, table, l1i, j, hi, lo, host, inCluster }, pos - offset, n);
        pos += n;
        continue;
      }
      const dest = this.writeTarget(table, l1i, j, hi, lo, host) + inCluster;
      if (runLen === 0 || runHost + runLen !== dest) {
        endRun();
        runHost = dest;
        runSkip = pos - offset;
      }
      runLen += n;
      pos += n;
    }
    endRun();
    return true;
  }

  /**
   * Whether a write of `n` bytes at `inCluster` into the cluster of this L2
   * entry must copy the old content first: a partial write over compressed
   * or shared (not COPIED) data. Anything else goes in place or to a fresh
   * cluster (writeTarget).
   */
  private needsCopyOnWrite(hi: number, lo: number, host: number, inCluster: number, n: number): boolean {
    if ((lo & 1) !== 0 || (inCluster === 0 && n === this.l2.clusterSize)) return false;
    if ((hi & FLAG_COMPRESSED) !== 0) return true;
    return host !== 0 && (hi & FLAG_COPIED) === 0;
  }

  /** The host cluster a write goes to when it needs no copy-on-write: in place, or a fresh cluster (a hole, zeros already) that the entry now names. */
  private writeTarget(table: Buffer, l1i: number, j: number, hi: number, lo: number, host: number): number {
    if ((hi & FLAG_COMPRESSED) === 0 && host !== 0 && (lo & 1) === 0 && (hi & FLAG_COPIED) !== 0) return host;
    const target = this.refs.allocate(1);
    this.releaseEntry(hi, lo, host);
    setL2(table, j, target);
    this.l2.dirty.add(l1i);
    return target;
  }

  private copyOnWrite(dataFile: GuestDataFile | null, cluster: CowCluster, slices: Buffer[]): Promise<void> {
    const { gci, table, l1i, j, hi, lo, host, inCluster } = cluster;
    const target = this.refs.allocate(1);
    // Pin the table in the cache until the entry is switched over.
    this.l2.dirty.add(l1i);
    const data = gci * this.l2.clusterSize < this.virtualSize ? dataFile : null;
    const p = (async () => {
      let content: Buffer;
      if ((hi & FLAG_COMPRESSED) !== 0) {
        content = Buffer.from(await this.compressed.inflate(hi, lo));
      } else {
        content = Buffer.alloc(this.l2.clusterSize);
        if (data) await data.read(content, 0, content.length, host);
        else await readFully(this.l2.fh, content, host);
      }
      let at = inCluster;
      for (const s of slices) {
        s.copy(content, at);
        at += s.length;
      }
      if (data) await data.writev(target, [content], content.length);
      else await writeSlices(this.l2.fh, [content], target, content.length);
      this.releaseEntry(hi, lo, host);
      setL2(table, j, target);
      this.l2.dirty.add(l1i);
    })();
    this.cow.set(gci, p);
    const done = (): void => {
      if (this.cow.get(gci) === p) this.cow.delete(gci);
    };
    p.then(done, done);
    return p;
  }

  /** Drop the reference an L2 entry held on host clusters. */
  private releaseEntry(hi: number, lo: number, host: number): void {
    if ((hi & FLAG_COMPRESSED) !== 0) {
      const coff = this.compressed.offset(hi, lo);
      this.refs.releaseRange(coff - (coff % 512), this.compressed.sectors(hi) * 512);
    } else if (host !== 0) {
      this.refs.decrement(host / this.l2.clusterSize);
    }
  }
}
