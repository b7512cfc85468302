import { readSync, constants as fsConstants } from 'fs';
import { open as openFile } from 'fs/promises';
import type { FileHandle } from 'fs/promises';
import { inflateRaw, constants as zlibConstants } from 'zlib';
import type { ZlibOptions } from 'zlib';
import { Qcow2Error } from './errors';
import { MAX_L1_ENTRIES, buildHeader, clearAutoclear, parseHeader, patchHeader } from './header';
import { RefcountManager, readFully } from './refcount';
import { MappedFile } from './mapped-file';
import { native } from '../util/native';

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

const TWO32 = 4294967296;
const FLAG_COPIED = 0x80000000;
const FLAG_COMPRESSED = 0x40000000;
const MIB = 1024 * 1024;
/**
 * Clean L2 tables beyond this are evicted; images whose whole L2 set fits are
 * mapped completely at open so that allocatedRanges() can answer at once.
 */
const L2_CACHE_BYTES = 64 * MIB;

function inflateRawAsync(input: Buffer, opts: ZlibOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    inflateRaw(input, opts, (err, out) => (err ? reject(err) : resolve(out)));
  });
}

/** Consumes a list of buffers as one byte sequence, handing out subarrays. */
class BufferCursor {
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

async function writeSlices(fh: FileHandle, slices: Buffer[], position: number, length: number): Promise<void> {
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

/** Where walkRead() sends the pieces of a guest range, by output offset. */
interface ReadSink {
  /** `length` bytes at host offset `host`. */
  run(at: number, length: number, host: number): void;
  /** `length` bytes of zeros (a hole or a zero cluster). */
  zeros(at: number, length: number): void;
  /** Part of a compressed cluster; returns false to stop the walk. */
  compressed(at: number, length: number, hi: number, lo: number, inCluster: number): boolean;
}

/** A guest cluster whose partial write must copy its old content first, as planWrite() found it. */
interface CowCluster {
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
interface WriteSink {
  /** `length` bytes of the write, from byte `skip` of it on, go to host offset `host`. */
  run(host: number, skip: number, length: number): void;
  /** The `n` bytes from byte `skip` on land in a cluster that needs copy-on-write. Absent: such a write is declined. */
  copyOnWrite?(cluster: CowCluster, skip: number, n: number): void;
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
  /** Bits 0..(csizeShift-32-1) of the high word hold the compressed offset. */
  private readonly csizeShiftHigh: number;
  private readonly csizeMask: number;
  private readonly refs: RefcountManager;

  private header: Buffer;
  private headerWritten: Buffer | null = null;
  private l1: Buffer;
  private l1Size: number;
  private l1Offset: number;
  private l1Dirty = false;
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2Dirty = new Set<number>();
  private readonly l2Loading = new Map<number, Promise<void>>();
  /** Guest clusters being copied-on-write: other I/O on them waits. */
  private readonly cow = new Map<number, Promise<void>>();
  private readonly inflight = new Set<Promise<unknown>>();
  private inflated: { offset: number; data: Promise<Buffer> } | null = null;
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
    this.csizeShiftHigh = 62 - (s.clusterBits - 8) - 32;
    this.csizeMask = 2 ** (s.clusterBits - 8) - 1;
    this.header = s.header;
    this.l1 = s.l1;
    this.l1Size = s.l1Size;
    this.l1Offset = s.l1Offset;
    this.refs = s.refs;
    this.fileSize = s.fileSize;
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
      img.l1Dirty = true;
      await img.flush();
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
      await img.preloadIfSmall();
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
    return this.walkRead(offset, length, outOffset, {
      run: (at, n, host) => this.readRunSync(out, at, n, host),
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
    const walked = this.walkRead(offset, length, 0, {
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
    const fd = this.fh.fd;
    // No copyOnWrite in the sink: a write that needs one is declined before anything changes.
    const planned = this.planWrite(offset, length, {
      run: (host, skip, n) => {
        try {
          mod.pwriteSegments(fd, host, buffers, segments, count, skip, n);
        } catch (err) {
          throw new Qcow2Error(this.path, `write of ${n} bytes failed: ${(err as Error).message}`, host);
        }
      },
    });
    return planned === true;
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
      if (this.l2Offset(l1i) === 0) {
        const next = Math.min(end, (l1i + 1) * l2Span);
        push(pos, next - pos, false);
        pos = next;
        continue;
      }
      const table = this.l2Cache.get(l1i);
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
    let last = this.l1Size - 1;
    if (offset !== undefined) {
      first = Math.floor(offset / l2Span);
      last = Math.floor((offset + Math.max(1, length ?? 1) - 1) / l2Span);
    }
    const pending = this.loadTables(first, last);
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
    for (const l1i of this.l2Dirty) {
      const table = this.l2Cache.get(l1i) as Buffer;
      writes.push(writeSlices(this.fh, [table], this.l2Offset(l1i), table.length));
    }
    this.l2Dirty.clear();
    writes.push(this.refs.flush(this.fh));
    if (this.l1Dirty && this.l1Size > 0) {
      writes.push(writeSlices(this.fh, [this.l1.subarray(0, this.l1Size * 8)], this.l1Offset, this.l1Size * 8));
    }
    this.l1Dirty = false;
    await Promise.all(writes);

    patchHeader(this.header, {
      l1Size: this.l1Size,
      l1TableOffset: this.l1Offset,
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

  // ---- L1 / L2 ---------------------------------------------------------

  private l2Offset(l1i: number): number {
    if (l1i >= this.l1Size) return 0;
    return (this.l1.readUInt32BE(l1i * 8) & 0x00ffffff) * TWO32 + ((this.l1.readUInt32BE(l1i * 8 + 4) & 0xfffffe00) >>> 0);
  }

  private setL1(l1i: number, hostOffset: number): void {
    this.l1.writeUInt32BE((FLAG_COPIED | Math.floor(hostOffset / TWO32)) >>> 0, l1i * 8);
    this.l1.writeUInt32BE(hostOffset % TWO32 >>> 0, l1i * 8 + 4);
    this.l1Dirty = true;
  }

  /** Promise for loading the missing L2 tables of L1 range [first, last], or null if all are here. */
  private loadTables(first: number, last: number): Promise<unknown> | null {
    let pending: Promise<void>[] | null = null;
    for (let l1i = first; l1i <= last && l1i < this.l1Size; l1i++) {
      if (this.l2Cache.has(l1i) || this.l2Offset(l1i) === 0) continue;
      (pending ??= []).push(this.loadTable(l1i));
    }
    return pending ? Promise.all(pending) : null;
  }

  private loadTable(l1i: number): Promise<void> {
    const existing = this.l2Loading.get(l1i);
    if (existing) return existing;
    const off = this.l2Offset(l1i);
    const p = (async () => {
      const table = Buffer.allocUnsafe(this.clusterSize);
      await readFully(this.fh, table, off);
      if (!this.l2Cache.has(l1i)) {
        this.l2Cache.set(l1i, table);
        this.evictClean();
      }
    })();
    this.l2Loading.set(l1i, p);
    const done = (): void => {
      this.l2Loading.delete(l1i);
    };
    p.then(done, done);
    return p;
  }

  private evictClean(): void {
    const limit = Math.max(4, Math.floor(L2_CACHE_BYTES / this.clusterSize));
    if (this.l2Cache.size <= limit) return;
    for (const key of this.l2Cache.keys()) {
      if (this.l2Cache.size <= limit) break;
      if (!this.l2Dirty.has(key)) this.l2Cache.delete(key);
    }
  }

  private async preloadIfSmall(): Promise<void> {
    const offsets: Array<[number, number]> = [];
    for (let i = 0; i < this.l1Size; i++) {
      const off = this.l2Offset(i);
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
        this.l2Cache.set(offsets[k + m][1], buf.subarray(m * this.clusterSize, (m + 1) * this.clusterSize));
      }
      k += n;
    }
  }

  /** Grow the active L1 table so that index `l1i` exists (VM state lies past the disk). */
  private growL1(l1i: number): void {
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

  // ---- cluster entries ---------------------------------------------------

  private compressedOffset(hi: number, lo: number): number {
    return (hi & (2 ** this.csizeShiftHigh - 1)) * TWO32 + lo;
  }

  private compressedSectors(hi: number): number {
    return ((hi >>> this.csizeShiftHigh) & this.csizeMask) + 1;
  }

  private setL2(table: Buffer, j: number, hostOffset: number): void {
    table.writeUInt32BE((FLAG_COPIED | Math.floor(hostOffset / TWO32)) >>> 0, j * 8);
    table.writeUInt32BE(hostOffset % TWO32 >>> 0, j * 8 + 4);
  }

  /** Host offset of a standard entry, validated. */
  private standardOffset(hi: number, lo: number, l1i: number, j: number): number {
    const host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (host % this.clusterSize !== 0) {
      throw new Qcow2Error(this.path, `L2 entry ${j} of table ${l1i}: data cluster offset 0x${host.toString(16)} is not cluster aligned`, this.l2Offset(l1i) + j * 8);
    }
    return host;
  }

  /** Drop the reference an L2 entry held on host clusters. */
  private releaseEntry(hi: number, lo: number, host: number): void {
    if ((hi & FLAG_COMPRESSED) !== 0) {
      const coff = this.compressedOffset(hi, lo);
      this.refs.releaseRange(coff - (coff % 512), this.compressedSectors(hi) * 512);
    } else if (host !== 0) {
      this.refs.decrement(host / this.clusterSize);
    }
  }

  private inflate(hi: number, lo: number): Promise<Buffer> {
    const coff = this.compressedOffset(hi, lo);
    if (this.inflated && this.inflated.offset === coff) return this.inflated.data;
    const csize = this.compressedSectors(hi) * 512 - (coff % 512);
    const data = (async () => {
      const input = Buffer.alloc(csize);
      await readFully(this.fh, input, coff);
      let out: Buffer;
      try {
        // Sync flush: a stream may end exactly where the cluster is full, without an end marker.
        // At most one cluster: a small compressed cluster can claim gigabytes.
        out = await inflateRawAsync(input, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
          throw new Qcow2Error(this.path, `compressed cluster inflates to more than the cluster size (${this.clusterSize} bytes)`, coff);
        }
        throw new Qcow2Error(this.path, `compressed cluster does not inflate: ${(err as Error).message}`, coff);
      }
      if (out.length < this.clusterSize) {
        throw new Qcow2Error(this.path, `compressed cluster inflates to ${out.length} bytes, expected ${this.clusterSize}`, coff);
      }
      return out.length === this.clusterSize ? out : out.subarray(0, this.clusterSize);
    })();
    this.inflated = { offset: coff, data };
    data.catch(() => {
      if (this.inflated?.data === data) this.inflated = null;
    });
    return data;
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
    if (this.cow.size === 0 && !this.loadTables(firstL1, lastL1)) {
      let tasks: Promise<void>[] | null;
      try {
        tasks = this.planRead(offset, length, out, outOffset);
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
    const tasks = await this.whenMapped(offset, length, () => this.planRead(offset, length, out, outOffset));
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
      const loads = this.loadTables(Math.floor(offset / l2Span), Math.floor((offset + length - 1) / l2Span));
      if (loads) await loads;
      const waits = this.cowWaits(firstC, lastC);
      if (waits) await waits;
      const planned = plan();
      if (planned !== null) return planned;
    }
  }

  /** Map a guest range to host reads into `out` from `outOffset` on; null if an L2 table went missing meanwhile. */
  private planRead(offset: number, length: number, out: Buffer, outOffset: number): Promise<void>[] | null {
    const tasks: Promise<void>[] = [];
    const data = offset < this.virtualSize ? this.dataFile : null;
    const mapped = this.walkRead(offset, length, outOffset, {
      run: (at, n, host) => void tasks.push(data ? data.read(out, at, n, host) : this.readRun(out, at, n, host)),
      zeros: (at, n) => void out.fill(0, at, at + n),
      compressed: (at, n, hi, lo, inCluster) => {
        tasks.push(this.inflate(hi, lo).then((data) => void data.copy(out, at, inCluster, inCluster + n)));
        return true;
      },
    });
    return mapped ? tasks : null;
  }

  /**
   * Walks how guest bytes [offset, offset+length) lie in the file, telling
   * `sink` where each piece goes in the output (from `outOffset` on):
   * contiguous host ranges as one run, holes and zero clusters as zeros,
   * compressed clusters one by one. False when an L2 table of the range is
   * not in memory, or when sink.compressed() says stop.
   */
  private walkRead(offset: number, length: number, outOffset: number, sink: ReadSink): boolean {
    const cs = this.clusterSize;
    const l2Span = cs * this.l2Entries;
    const end = offset + length;
    for (let l1i = Math.floor(offset / l2Span); l1i <= Math.floor((end - 1) / l2Span); l1i++) {
      if (this.l2Offset(l1i) !== 0 && !this.l2Cache.has(l1i)) return false;
    }
    let runHost = -1;
    let runOut = 0;
    let runLen = 0;
    const endRun = (): void => {
      if (runLen > 0) sink.run(runOut, runLen, runHost);
      runLen = 0;
    };
    let pos = offset;
    while (pos < end) {
      const gci = Math.floor(pos / cs);
      const inCluster = pos - gci * cs;
      const n = Math.min(cs - inCluster, end - pos);
      const at = outOffset + pos - offset;
      const l1i = Math.floor(gci / this.l2Entries);
      const table = this.l2Offset(l1i) === 0 ? undefined : this.l2Cache.get(l1i);
      pos += n;
      if (!table) {
        endRun();
        sink.zeros(at, n);
        continue;
      }
      const j = gci - l1i * this.l2Entries;
      const hi = table.readUInt32BE(j * 8);
      const lo = table.readUInt32BE(j * 8 + 4);
      if ((hi & FLAG_COMPRESSED) !== 0) {
        endRun();
        if (!sink.compressed(at, n, hi, lo, inCluster)) return false;
        continue;
      }
      const host = this.standardOffset(hi, lo, l1i, j);
      if ((lo & 1) !== 0 || host === 0) {
        endRun();
        sink.zeros(at, n);
        continue;
      }
      if (runLen > 0 && runHost + runLen === host + inCluster) {
        runLen += n;
      } else {
        endRun();
        runHost = host + inCluster;
        runOut = at;
        runLen = n;
      }
    }
    endRun();
    return true;
  }

  private readRun(out: Buffer, at: number, length: number, host: number): Promise<void> {
    return this.fh.read(out, at, length, host).then(({ bytesRead }) => {
      // Short: past the end of the file (allocated, not yet written) reads as zeros.
      if (bytesRead < length) return readFully(this.fh, out.subarray(at + bytesRead, at + length), host + bytesRead);
    });
  }

  /** readRun() with pread(2) on this thread; short reads past the end of the file are zeros. */
  private readRunSync(out: Buffer, at: number, length: number, host: number): void {
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        n = readSync(this.fh.fd, out, at + done, length - done, host + done);
      } catch (err) {
        throw new Qcow2Error(this.path, `read of ${length - done} bytes failed: ${(err as Error).message}`, host + done);
      }
      if (n === 0) {
        out.fill(0, at + done, at + length);
        return;
      }
      done += n;
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
    await Promise.all(await this.whenMapped(offset, length, () => this.planWriteTasks(offset, buffers, length)));
  }

  /**
   * planWrite() for writes from buffers, asynchronous: contiguous host
   * ranges become one positional (v)write each (through the guest data
   * file when there is one). Null if an L2 table is missing.
   */
  private planWriteTasks(offset: number, buffers: Buffer[], length: number): Promise<void>[] | null {
    const cursor = new BufferCursor(buffers);
    const tasks: Promise<void>[] = [];
    const data = offset < this.virtualSize ? this.dataFile : null;
    const planned = this.planWrite(offset, length, {
      run: (host, _skip, n) => {
        const slices: Buffer[] = [];
        cursor.take(n, slices);
        tasks.push(data ? data.writev(host, slices, n) : writeSlices(this.fh, slices, host, n));
      },
      copyOnWrite: (cluster, _skip, n) => {
        const slices: Buffer[] = [];
        cursor.take(n, slices);
        tasks.push(this.copyOnWrite(cluster, slices));
      },
    });
    return planned === null ? null : tasks;
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
  private planWrite(offset: number, length: number, sink: WriteSink): boolean | null {
    const cs = this.clusterSize;
    const l2Span = cs * this.l2Entries;
    const end = offset + length;
    const lastL1 = Math.floor((end - 1) / l2Span);
    for (let l1i = Math.floor(offset / l2Span); l1i <= lastL1; l1i++) {
      if (this.l2Offset(l1i) !== 0 && !this.l2Cache.has(l1i)) return null;
    }
    if (sink.copyOnWrite === undefined) {
      for (let pos = offset; pos < end; ) {
        const gci = Math.floor(pos / cs);
        const inCluster = pos - gci * cs;
        const n = Math.min(cs - inCluster, end - pos);
        pos += n;
        const l1i = Math.floor(gci / this.l2Entries);
        const table = this.l2Offset(l1i) === 0 ? undefined : this.l2Cache.get(l1i);
        if (table === undefined) continue; // a new table: holes only
        const j = gci - l1i * this.l2Entries;
        const hi = table.readUInt32BE(j * 8);
        const lo = table.readUInt32BE(j * 8 + 4);
        const host = (hi & FLAG_COMPRESSED) !== 0 ? 0 : this.standardOffset(hi, lo, l1i, j);
        if (this.needsCopyOnWrite(hi, lo, host, inCluster, n)) return false;
      }
    }
    if (lastL1 >= this.l1Size) this.growL1(lastL1);

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
      const l1i = Math.floor(gci / this.l2Entries);
      const j = gci - l1i * this.l2Entries;
      const table = this.tableForWrite(l1i);
      const hi = table.readUInt32BE(j * 8);
      const lo = table.readUInt32BE(j * 8 + 4);
      const host = (hi & FLAG_COMPRESSED) !== 0 ? 0 : this.standardOffset(hi, lo, l1i, j);
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
    if ((lo & 1) !== 0 || (inCluster === 0 && n === this.clusterSize)) return false;
    if ((hi & FLAG_COMPRESSED) !== 0) return true;
    return host !== 0 && (hi & FLAG_COPIED) === 0;
  }

  /** The host cluster a write goes to when it needs no copy-on-write: in place, or a fresh cluster (a hole, zeros already) that the entry now names. */
  private writeTarget(table: Buffer, l1i: number, j: number, hi: number, lo: number, host: number): number {
    if ((hi & FLAG_COMPRESSED) === 0 && host !== 0 && (lo & 1) === 0 && (hi & FLAG_COPIED) !== 0) return host;
    const target = this.refs.allocate(1);
    this.releaseEntry(hi, lo, host);
    this.setL2(table, j, target);
    this.l2Dirty.add(l1i);
    return target;
  }

  private tableForWrite(l1i: number): Buffer {
    const off = this.l2Offset(l1i);
    if (off === 0) {
      const table = Buffer.alloc(this.clusterSize);
      this.setL1(l1i, this.refs.allocate(1));
      this.l2Cache.set(l1i, table);
      this.l2Dirty.add(l1i);
      return table;
    }
    if ((this.l1.readUInt32BE(l1i * 8) & FLAG_COPIED) === 0) {
      throw new Qcow2Error(this.path, `L2 table ${l1i} is shared (no COPIED flag); writing to it is not supported`, this.l1Offset + l1i * 8);
    }
    return this.l2Cache.get(l1i) as Buffer;
  }

  private copyOnWrite(cluster: CowCluster, slices: Buffer[]): Promise<void> {
    const { gci, table, l1i, j, hi, lo, host, inCluster } = cluster;
    const target = this.refs.allocate(1);
    // Pin the table in the cache until the entry is switched over.
    this.l2Dirty.add(l1i);
    const data = gci * this.clusterSize < this.virtualSize ? this.dataFile : null;
    const p = (async () => {
      let content: Buffer;
      if ((hi & FLAG_COMPRESSED) !== 0) {
        content = Buffer.from(await this.inflate(hi, lo));
      } else {
        content = Buffer.alloc(this.clusterSize);
        if (data) await data.read(content, 0, content.length, host);
        else await readFully(this.fh, content, host);
      }
      let at = inCluster;
      for (const s of slices) {
        s.copy(content, at);
        at += s.length;
      }
      if (data) await data.writev(target, [content], content.length);
      else await writeSlices(this.fh, [content], target, content.length);
      this.releaseEntry(hi, lo, host);
      this.setL2(table, j, target);
      this.l2Dirty.add(l1i);
    })();
    this.cow.set(gci, p);
    const done = (): void => {
      if (this.cow.get(gci) === p) this.cow.delete(gci);
    };
    p.then(done, done);
    return p;
  }
}
