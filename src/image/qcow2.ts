import { constants as fsConstants } from 'fs';
import { open as openFile } from 'fs/promises';
import type { FileHandle } from 'fs/promises';
import { Qcow2Error } from './errors';
import { MAX_L1_ENTRIES, buildHeader, clearAutoclear, parseHeader, patchHeader } from './header';
import { RefcountManager, readFully } from './refcount';
import { MappedFile } from './mapped-file';
import { native } from '../util/native';
import { FLAG_COMPRESSED, L2Cache, TWO32 } from './l2-cache';
import { CompressedClusters } from './compressed';
import { planRead, readRunSync, walkRead } from './qcow2-read';
import { WritePath, writeSlices } from './qcow2-write';

export interface Qcow2CreateOptions {
  virtualSize: number;
  /** 64 KiB .. 2 MiB, a power of two; default 1 MiB. */
  clusterSize?: number;
  /** 1..64, a power of two; default 16. */
  refcountBits?: number;
  /**
   * An empty file, open read-write, to build the image in (an unnamed
   * O_TMPFILE one): `path` then only names it in messages. Closed with the image.
   */
  file?: FileHandle;
  /** Extra open(2) flags for the image file (O_DSYNC for write-through). */
  openFlags?: number;
  /**
   * Write nothing yet: the first flush() writes the header, the tables and
   * the file's size. For a file nobody opens before that flush (save's
   * unnamed or temporary image): create() then returns without waiting for
   * any I/O.
   */
  deferFlush?: boolean;
}

/**
 * Where guest data (the virtual disk's clusters, not the metadata and not
 * the VM state) is read and written instead of the image's own descriptor:
 * a second descriptor of the same file, open with O_DIRECT (cache modes
 * none and directsync). The two never touch the same host cluster, so the
 * page cache (metadata) and direct I/O (data) stay coherent, and one fsync
 * of either descriptor makes the whole inode durable.
 */
export interface GuestDataFile {
  writev(position: number, slices: Buffer[], length: number): Promise<void>;
  /** `length` bytes at `position` into out[at..]; zeros past the end of the file. */
  read(out: Buffer, at: number, length: number, position: number): Promise<void>;
}

export interface Qcow2OpenOptions {
  writable?: boolean;
}

export interface Qcow2FlushOptions {
  /** fsync the file after the metadata is written. */
  sync?: boolean;
}

export interface AllocatedRange {
  offset: number;
  length: number;
  allocated: boolean;
}

const MIB = 1024 * 1024;

interface ImageState {
  path: string;
  fh: FileHandle;
  writable: boolean;
  clusterBits: number;
  virtualSize: number;
  header: Buffer;
  l1: Buffer;
  l1Size: number;
  l1Offset: number;
  refs: RefcountManager;
  fileSize: number;
}

/**
 * A QCOW2 version 3 image: guest reads and writes, and the VM state area
 * that lies past the virtual disk. All metadata is kept in memory and only
 * written by flush()/close(); allocation is synchronous, so writes may run
 * concurrently (positional I/O). Clusters are always appended at the end of
 * the file and never reused.
 */
export class Qcow2Image {
  readonly path: string;
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly vmStateOffset: number;

  private readonly fh: FileHandle;
  private readonly writable: boolean;
  private readonly clusterBits: number;
  private readonly l2Entries: number;
  private readonly refs: RefcountManager;

  private header: Buffer;
  private headerWritten: Buffer | null = null;
  /** The L1 table and the L2 tables in memory. */
  private readonly l2: L2Cache;
  private readonly compressed: CompressedClusters;
  private readonly writes: WritePath;
  /** Guest clusters being copied-on-write: other I/O on them waits. */
  private readonly cow = new Map<number, Promise<void>>();
  private readonly inflight = new Set<Promise<unknown>>();
  private fileSize: number;
  /** Views for viewSync(): undefined until first asked, null without the native module. */
  private mapped: MappedFile | null | undefined;
  private closed = false;
  private dataFile: GuestDataFile | null = null;

  private constructor(s: ImageState) {
    this.path = s.path;
    this.fh = s.fh;
    this.writable = s.writable;
    this.clusterBits = s.clusterBits;
    this.clusterSize = 2 ** s.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.virtualSize = s.virtualSize;
    const l2Span = this.clusterSize * this.l2Entries;
    this.vmStateOffset = Math.ceil(s.virtualSize / l2Span) * l2Span;
    this.header = s.header;
    this.refs = s.refs;
    this.fileSize = s.fileSize;
    this.l2 = new L2Cache({
      path: s.path, fh: s.fh, clusterSize: this.clusterSize, refs: s.refs, l1: s.l1, l1Size: s.l1Size, l1Offset: s.l1Offset,
    });
    this.compressed = new CompressedClusters(s.path, s.fh, s.clusterBits);
    this.writes = new WritePath(this.l2, s.refs, this.compressed, this.cow, s.virtualSize);
  }

  static async create(path: string, opts: Qcow2CreateOptions): Promise<Qcow2Image> {
    const clusterSize = opts.clusterSize ?? MIB;
    const refcountBits = opts.refcountBits ?? 16;
    const { virtualSize } = opts;
    if (!Number.isInteger(clusterSize) || clusterSize < 65536 || clusterSize > 2 * MIB || (clusterSize & (clusterSize - 1)) !== 0) {
      throw new Qcow2Error(path, `cluster size ${clusterSize} must be a power of two from 64 KiB to 2 MiB`);
    }
    if (!Number.isInteger(refcountBits) || refcountBits < 1 || refcountBits > 64 || (refcountBits & (refcountBits - 1)) !== 0) {
      throw new Qcow2Error(path, `refcount bits ${refcountBits} must be a power of two from 1 to 64`);
    }
    if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0 || virtualSize % 512 !== 0) {
      throw new Qcow2Error(path, `virtual size ${virtualSize} must be a positive multiple of 512`);
    }
    const clusterBits = Math.log2(clusterSize);
    const l1Size = Math.ceil(virtualSize / (clusterSize * (clusterSize / 8)));
    if (l1Size > MAX_L1_ENTRIES) throw new Qcow2Error(path, `virtual size ${virtualSize} is too large for ${clusterSize}-byte clusters`);

    const fh = opts.file ?? (await openFile(path, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC | (opts.openFlags ?? 0), 0o666));
    try {
      const refs = RefcountManager.createFresh(path, clusterSize, Math.log2(refcountBits));
      const l1Clusters = Math.ceil((l1Size * 8) / clusterSize);
      const l1Offset = refs.allocate(l1Clusters);
      const img = new Qcow2Image({
        path,
        fh,
        writable: true,
        clusterBits,
        virtualSize,
        header: buildHeader({ clusterBits, virtualSize, refcountOrder: Math.log2(refcountBits) }),
        l1: Buffer.alloc(l1Clusters * clusterSize),
        l1Size,
        l1Offset,
        refs,
        fileSize: 0,
      });
      img.l2.l1Dirty = true;
      if (!opts.deferFlush) await img.flush();
      return img;
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  static async open(path: string, opts: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    const writable = opts.writable === true;
    const fh = await openFile(path, writable ? 'r+' : 'r');
    try {
      const fileSize = (await fh.stat()).size;
      let head = Buffer.alloc(Math.min(fileSize, 65536));
      await readFully(fh, head, 0);
      if (head.length >= 104 && head.readUInt32BE(100) > head.length && fileSize >= head.readUInt32BE(100)) {
        head = Buffer.alloc(head.readUInt32BE(100));
        await readFully(fh, head, 0);
      }
      const h = parseHeader(path, head, fileSize);
      if (writable && h.nbSnapshots > 0) {
        throw new Qcow2Error(path, `image has ${h.nbSnapshots} internal snapshot(s); writing to it is not supported`, 60);
      }
      const clusterSize = 2 ** h.clusterBits;
      // Read-only: the refcount blocks are not loaded (allocatedBytes() counts them one at a time).
      const refs = await RefcountManager.load(
        path, fh, fileSize, clusterSize, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters, !writable,
      );
      const l1Clusters = Math.ceil((h.l1Size * 8) / clusterSize);
      const l1 = Buffer.alloc(l1Clusters * clusterSize);
      if (h.l1Size > 0) await readFully(fh, l1.subarray(0, h.l1Size * 8), h.l1TableOffset);
      for (let i = 0; i < h.l1Size; i++) {
        const off = (l1.readUInt32BE(i * 8) & 0x00ffffff) * TWO32 + ((l1.readUInt32BE(i * 8 + 4) & 0xfffffe00) >>> 0);
        if (off % clusterSize !== 0) {
          throw new Qcow2Error(path, `L1 entry ${i}: L2 table offset 0x${off.toString(16)} is not cluster aligned`, h.l1TableOffset + i * 8);
        }
        if (off !== 0 && off >= fileSize) {
          throw new Qcow2Error(path, `L1 entry ${i}: L2 table at 0x${off.toString(16)} lies outside the file (${fileSize} bytes)`, h.l1TableOffset + i * 8);
        }
      }
      const header = Buffer.from(head.subarray(0, h.headerLength));
      const img = new Qcow2Image({
        path,
        fh,
        writable,
        clusterBits: h.clusterBits,
        virtualSize: h.virtualSize,
        header,
        l1,
        l1Size: h.l1Size,
        l1Offset: h.l1TableOffset,
        refs,
        fileSize,
      });
      img.headerWritten = Buffer.from(header);
      if (writable && (h.autoclearLow !== 0 || h.autoclearHigh !== 0)) clearAutoclear(img.header);
      await img.l2.preloadIfSmall();
      return img;
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  // ---- public I/O -------------------------------------------------------

  /**
   * Sends guest data reads and writes through `file` from now on (null: the
   * image's own descriptor again). The synchronous paths (readIntoSync,
   * viewSync, writeSegmentsSync) then decline, as they use the image's own
   * descriptor.
   */
  setDataFile(file: GuestDataFile | null): void {
    this.dataFile = file;
  }

  read(offset: number, length: number): Promise<Buffer> {
    this.checkGuestRange('read', offset, length);
    return this.track(this.readAt(offset, length, Buffer.allocUnsafe(length), 0));
  }

  /**
   * read() into the caller's buffer: guest bytes [offset, offset+length)
   * land in `out` from `outOffset` on. Lets a reader reuse its buffers
   * (fresh ones cost page faults on every read).
   */
  readInto(offset: number, length: number, out: Buffer, outOffset = 0): Promise<void> {
    this.checkGuestRange('read', offset, length);
    this.checkOut(out, outOffset, length);
    return this.track(this.readAt(offset, length, out, outOffset)).then(() => undefined);
  }

  /**
   * readInto() now, on the calling thread, when that takes no waiting on
   * metadata: the range's L2 tables are in memory, it holds no compressed
   * cluster and no copy-on-write is running. Returns false otherwise (out
   * may then be partly written: use readInto()). For a reader whose data is
   * in the page cache, where a pread(2) costs less than the two thread
   * hand-overs of an asynchronous read.
   */
  readIntoSync(offset: number, length: number, out: Buffer, outOffset = 0): boolean {
    this.checkGuestRange('read', offset, length);
    this.checkOut(out, outOffset, length);
    if (length === 0) return true;
    if (this.cow.size !== 0 || this.dataFile !== null) return false;
    return walkRead(this.l2, offset, length, outOffset, {
      run: (at, n, host) => readRunSync(this.fh, this.path, out, at, n, host),
      zeros: (at, n) => void out.fill(0, at, at + n),
      compressed: () => false,
    });
  }

  /**
   * Guest bytes [offset, offset+length) as a read-only view of the file's
   * pages (mmap), when the image is open read-only, the native module is
   * built, the range's L2 tables are in memory and the range lies in one
   * contiguous run of data clusters inside the file. Null otherwise: read
   * instead. Saves the copy a read makes. A view is for reading at once:
   * it stays valid, but its pages leave memory when a later view moves the
   * window on.
   */
  viewSync(offset: number, length: number): Buffer | null {
    this.checkGuestRange('read', offset, length);
    if (this.writable || length === 0 || this.cow.size !== 0 || this.dataFile !== null) return null;
    if (this.mapped === undefined) {
      const mod = native();
      this.mapped = mod ? new MappedFile(mod, this.fh.fd, this.fileSize) : null;
    }
    const mapped = this.mapped;
    if (mapped === null) return null;
    let host = -1;
    let pieces = 0;
    const walked = walkRead(this.l2, offset, length, 0, {
      run: (at, n, h) => {
        pieces++;
        if (at === 0 && n === length) host = h;
      },
      zeros: () => void pieces++,
      compressed: () => false,
    });
    return walked && pieces === 1 && host >= 0 ? mapped.view(host, length) : null;
  }

  write(offset: number, data: Buffer): Promise<void> {
    this.checkWritable();
    this.checkGuestRange('write', offset, data.length);
    return this.track(this.writeAt(offset, [data], data.length));
  }

  writev(offset: number, buffers: Buffer[]): Promise<void> {
    this.checkWritable();
    let length = 0;
    for (const b of buffers) length += b.length;
    this.checkGuestRange('write', offset, length);
    return this.track(this.writeAt(offset, buffers, length));
  }

  /**
   * write() now, on this thread, of `length` bytes that `segments`
   * describes: `count` triples (index into `buffers`, offset, length), as
   * the native module's pwriteSegments takes them. The caller may reuse the
   * buffers when it returns: no copy of them is made, and no thread hop.
   * Returns false, having changed nothing, when only write() can do it: no
   * native module, an L2 table of the range not in memory, or copy-on-write
   * running or needed in the range.
   */
  writeSegmentsSync(offset: number, length: number, buffers: Buffer[], segments: Float64Array, count: number): boolean {
    this.checkWritable();
    this.checkGuestRange('write', offset, length);
    if (length === 0) return true;
    const mod = native();
    if (!mod || this.cow.size !== 0 || this.dataFile !== null) return false;
    return this.writes.writeSegmentsSync(mod, offset, length, buffers, segments, count);
  }

  readVmState(offset: number, length: number): Promise<Buffer> {
    this.checkVmStateRange('read', offset, length);
    return this.track(this.readAt(this.vmStateOffset + offset, length, Buffer.allocUnsafe(length), 0));
  }

  writeVmState(offset: number, data: Buffer): Promise<void> {
    this.checkWritable();
    this.checkVmStateRange('write', offset, data.length);
    return this.track(this.writeAt(this.vmStateOffset + offset, [data], data.length));
  }

  /**
   * Allocation map of a guest range (VM state offsets work too, as guest
   * offsets from vmStateOffset on), merged into runs. Zero-flag clusters
   * count as unallocated. Needs the L2 tables in memory: they are loaded at
   * open unless the image maps more than 64 MiB of them, see loadMetadata().
   */
  allocatedRanges(offset: number, length: number): AllocatedRange[] {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new Qcow2Error(this.path, `allocatedRanges: invalid range offset ${offset} length ${length}`);
    }
    const out: AllocatedRange[] = [];
    const push = (at: number, len: number, allocated: boolean): void => {
      const last = out[out.length - 1];
      if (last && last.allocated === allocated) last.length += len;
      else out.push({ offset: at, length: len, allocated });
    };
    const cs = this.clusterSize;
    const l2Span = cs * this.l2Entries;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / l2Span);
      if (this.l2.tableOffset(l1i) === 0) {
        const next = Math.min(end, (l1i + 1) * l2Span);
        push(pos, next - pos, false);
        pos = next;
        continue;
      }
      const table = this.l2.tables.get(l1i);
      if (!table) {
        throw new Qcow2Error(this.path, `allocation map for guest offset ${pos} is not in memory; await loadMetadata() first`);
      }
      const tableEnd = Math.min(end, (l1i + 1) * l2Span);
      while (pos < tableEnd) {
        const gci = Math.floor(pos / cs);
        const j = gci - l1i * this.l2Entries;
        const hi = table.readUInt32BE(j * 8);
        const lo = table.readUInt32BE(j * 8 + 4);
        const allocated = (hi & FLAG_COMPRESSED) !== 0 || ((lo & 1) === 0 && ((hi & 0x00ffffff) !== 0 || (lo & 0xfffffe00) !== 0));
        const next = Math.min(tableEnd, (gci + 1) * cs);
        push(pos, next - pos, allocated);
        pos = next;
      }
    }
    return out;
  }

  /** Bring the L2 tables of a guest range into memory (the whole active L1 table by default). */
  async loadMetadata(offset?: number, length?: number): Promise<void> {
    this.checkOpen();
    const l2Span = this.clusterSize * this.l2Entries;
    let first = 0;
    let last = this.l2.l1Size - 1;
    if (offset !== undefined) {
      first = Math.floor(offset / l2Span);
      last = Math.floor((offset + Math.max(1, length ?? 1) - 1) / l2Span);
    }
    const pending = this.l2.loadTables(first, last);
    if (pending) await pending;
  }

  /** Host bytes in use: every cluster with a non-zero refcount (data and metadata). */
  allocatedBytes(): number {
    if (!this.writable) return this.refs.countUsedSync(this.fh.fd) * this.clusterSize;
    return this.refs.usedClusters * this.clusterSize;
  }

  /** The image file's size in bytes. */
  get fileBytes(): number {
    return this.fileSize;
  }

  async flush(opts: Qcow2FlushOptions = {}): Promise<void> {
    this.checkOpen();
    if (!this.writable) return;
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
    const writes: Promise<unknown>[] = [];
    const l2 = this.l2;
    for (const l1i of l2.dirty) {
      const table = l2.tables.get(l1i) as Buffer;
      writes.push(writeSlices(this.fh, [table], l2.tableOffset(l1i), table.length));
    }
    l2.dirty.clear();
    writes.push(this.refs.flush(this.fh));
    if (l2.l1Dirty && l2.l1Size > 0) {
      writes.push(writeSlices(this.fh, [l2.l1.subarray(0, l2.l1Size * 8)], l2.l1Offset, l2.l1Size * 8));
    }
    l2.l1Dirty = false;
    await Promise.all(writes);

    patchHeader(this.header, {
      l1Size: l2.l1Size,
      l1TableOffset: l2.l1Offset,
      refcountTableOffset: this.refs.tableOffset,
      refcountTableClusters: this.refs.tableClusters,
    });
    if (!this.headerWritten || !this.headerWritten.equals(this.header)) {
      await writeSlices(this.fh, [this.header], 0, this.header.length);
      this.headerWritten = Buffer.from(this.header);
    }
    // Cover every allocated cluster, so that the file ends where the refcounts say (sparse).
    const end = this.refs.nextFree * this.clusterSize;
    if (end > this.fileSize) {
      await this.fh.truncate(end);
      this.fileSize = end;
    }
    if (opts.sync) await this.fh.sync();
  }

  /**
   * Starts writing data already written back to the disk (fdatasync), with
   * no metadata flush: a long writer calls it now and then so that the final
   * flush({ sync: true }) has little left to wait for.
   */
  async writeback(): Promise<void> {
    this.checkOpen();
    if (this.writable) await this.fh.datasync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.flush();
    } finally {
      this.closed = true;
      await this.fh.close();
    }
  }

  // ---- checks ------------------------------------------------------------

  private checkOpen(): void {
    if (this.closed) throw new Qcow2Error(this.path, 'image is closed');
  }

  private checkWritable(): void {
    this.checkOpen();
    if (!this.writable) throw new Qcow2Error(this.path, 'image is open read-only');
  }

  private checkGuestRange(op: string, offset: number, length: number): void {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new Qcow2Error(this.path, `${op} of ${length} bytes at guest offset ${offset} is outside the virtual disk (${this.virtualSize} bytes)`);
    }
  }

  private checkVmStateRange(op: string, offset: number, length: number): void {
    this.checkOpen();
    const limit = MAX_L1_ENTRIES * this.clusterSize * this.l2Entries - this.vmStateOffset;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > limit) {
      throw new Qcow2Error(this.path, `VM state ${op} of ${length} bytes at offset ${offset} is out of range`);
    }
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    const done = (): void => {
      this.inflight.delete(p);
    };
    p.then(done, done);
    return p;
  }

  private cowWaits(firstCluster: number, lastCluster: number): Promise<unknown> | null {
    if (this.cow.size === 0) return null;
    let waits: Promise<void>[] | null = null;
    for (const [gci, p] of this.cow) {
      if (gci >= firstCluster && gci <= lastCluster) (waits ??= []).push(p);
    }
    return waits ? Promise.allSettled(waits) : null;
  }

  // ---- read path ---------------------------------------------------------

  /** Guest range → `out` from `outOffset` on; resolves to `out`. */
  private readAt(offset: number, length: number, out: Buffer, outOffset: number): Promise<Buffer> {
    if (length === 0) return Promise.resolve(out);
    const cs = this.clusterSize;
    const l2Span = cs * this.l2Entries;
    const firstL1 = Math.floor(offset / l2Span);
    const lastL1 = Math.floor((offset + length - 1) / l2Span);
    // Fast path (tables cached, no copy-on-write around): no extra awaits per request.
    if (this.cow.size === 0 && !this.l2.loadTables(firstL1, lastL1)) {
      let tasks: Promise<void>[] | null;
      try {
        tasks = planRead(this.l2, this.compressed, this.dataFile, this.virtualSize, offset, length, out, outOffset);
      } catch (err) {
        // Corrupt metadata is reported like an I/O error: as a rejection.
        return Promise.reject(err);
      }
      if (tasks) {
        if (tasks.length === 0) return Promise.resolve(out);
        return (tasks.length === 1 ? tasks[0] : Promise.all(tasks)).then(() => out);
      }
    }
    return this.readAtSlow(offset, length, out, outOffset);
  }

  private async readAtSlow(offset: number, length: number, out: Buffer, outOffset: number): Promise<Buffer> {
    const tasks = await this.whenMapped(offset, length, () => planRead(this.l2, this.compressed, this.dataFile, this.virtualSize, offset, length, out, outOffset));
    if (tasks.length > 0) await Promise.all(tasks);
    return out;
  }

  /**
   * Loads the L2 tables a guest range needs and waits out copy-on-writes in
   * it, then plans the I/O; again if a table went missing meanwhile (`plan`
   * returned null).
   */
  private async whenMapped<T>(offset: number, length: number, plan: () => T | null): Promise<T> {
    const cs = this.clusterSize;
    const l2Span = cs * this.l2Entries;
    const firstC = Math.floor(offset / cs);
    const lastC = Math.floor((offset + length - 1) / cs);
    for (;;) {
      const loads = this.l2.loadTables(Math.floor(offset / l2Span), Math.floor((offset + length - 1) / l2Span));
      if (loads) await loads;
      const waits = this.cowWaits(firstC, lastC);
      if (waits) await waits;
      const planned = plan();
      if (planned !== null) return planned;
    }
  }

  private checkOut(out: Buffer, outOffset: number, length: number): void {
    if (!Number.isSafeInteger(outOffset) || outOffset < 0 || outOffset + length > out.length) {
      throw new Qcow2Error(this.path, `read of ${length} bytes does not fit a ${out.length}-byte buffer at offset ${outOffset}`);
    }
  }

  // ---- write path --------------------------------------------------------

  private async writeAt(offset: number, buffers: Buffer[], length: number): Promise<void> {
    if (length === 0) return;
    await Promise.all(await this.whenMapped(offset, length, () => this.writes.planWriteTasks(this.dataFile, offset, buffers, length)));
  }
}
