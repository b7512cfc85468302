// Records of a migration stream → block writes of a snapshot image.
//
// This is the join between the stream codec (which knows nothing of QCOW2)
// and the image (which knows nothing of migration). It decides where every
// page goes on the virtual disk, coalesces contiguous pages into large
// writes, keeps the leader and the device state for the VM state area, and
// remembers which pages hold data so that a page re-sent as zero is zeroed on
// disk and the data-page count is exact.
import { Transform } from 'streamx';
import type { BlockWrite } from '../blockio';
import { encodeRecord } from '../migration/encoder';
import type { FramedRecord, MigrationRecord, RamCompressedRecord, RamPageRunRecord, RamXbzrleRecord } from '../migration/records';
import * as zlib from 'node:zlib';
import { applyXbzrle, XbzrleDecodeError } from '../migration/xbzrle';
import { printable } from '../util/text';
import { Command } from '../migration/constants';
import { QemuSnapError } from '../errors';
import { layoutRamBlocks, RamBlockLayout, VMSTATE_HEADER_SIZE, isValidPageSize } from './layout';
import { copySegmentsInto, RunBufferPool } from './run-buffers';
import { PageBits } from '../util/page-bits';

export class SnapshotSaveError extends QemuSnapError {
  constructor(readonly streamOffset: number, message: string) {
    super(`${message} (at stream byte ${streamOffset})`);
  }
}

export interface SnapshotWriterOptions {
  /** Page size to use when the stream's configuration does not name one. */
  pageSize?: number;
  /** Called once the block list is known; resolves with the guest offset of the VM state area. */
  prepareImage(virtualSize: number, blocks: RamBlockLayout[]): Promise<number>;
  /** Commands are not stored; the caller may answer them (PING → PONG). */
  onCommand?(command: number, payload: Buffer, streamOffset: number): void;
  /**
   * Largest coalesced write, in bytes (default 1 MiB, a power of two). Runs
   * never cross a multiple of it, so each lies in one digest chunk.
   */
  maxRunBytes?: number;
  /**
   * Takes each run now, as segments over the caller's buffers (the input
   * chunks), instead of a copy pushed as a BlockWrite: it must be done with
   * the buffers when it returns. Returns false when it cannot (the run is
   * then copied and pushed, and so is every later one).
   */
  gather?: RunSink;
  /**
   * Reads the page at disk `offset` into `out` (returns null when it did so
   * at once). Needed for XBZRLE pages, which patch the last version of a
   * page: the writer calls it only once every write it pushed that overlaps
   * the page has completed, so the caller must report every completed write
   * through writeDone(). Without it XBZRLE pages are refused.
   */
  readPage?(offset: number, out: Buffer): Promise<void> | null;
  /**
   * Gather mode through the block ring: each run is pushed as a segment
   * BlockWrite over the input chunks (no copy), which the ring's target
   * may write synchronously. The chunks a run refers to are held
   * (releasedBefore) until writeDone() reports it. Ignored with `gather`.
   */
  segmentRuns?: boolean;
  /**
   * Copy mode, gathered: pages are gathered as segments over the input
   * chunks and each run is copied into a run buffer in one call as it
   * closes, by this function (`into` is the run buffer's first `length`
   * bytes), instead of page by page. The caller may digest the bytes on
   * the way (save under O_DIRECT). Not used while `gather` or
   * `segmentRuns` takes the runs.
   */
  copyRun?: CopyRunSink;
  /** Makes a run buffer of `size` bytes (default Buffer.allocUnsafeSlow); aligned memory for O_DIRECT. */
  allocateRun?: (size: number) => Buffer;
  /** Bytes of runs queued for the ring before this writer reports backpressure (default 4 MiB). */
  highWaterMark?: number;
}

/**
 * A run of pages at disk `offset`, `length` bytes: `count` triples (index
 * into `buffers`, offset, length) in `segments`, as the native module's
 * pwriteSegments takes them.
 */
export type RunSink = (offset: number, length: number, buffers: Buffer[], segments: Float64Array, count: number) => boolean;

/** Copies a run given as segments (as RunSink) into `into`, which is exactly `length` bytes long. */
export type CopyRunSink = (offset: number, length: number, into: Buffer, buffers: Buffer[], segments: Float64Array, count: number) => void;

/** A gathered run's limits: one segment per page, and the buffers the native call takes. */
const MAX_RUN_SEGMENTS = 1024;
const MAX_RUN_BUFFERS = 16;

/** What the writer learnt from the stream, for the STVM header and `info`. */
export interface SnapshotSummary {
  pageSize: number;
  blocks: RamBlockLayout[];
  virtualSize: number;
  /** Distinct pages holding data at the end of the stream. */
  dataPages: number;
  /** PAGE and ZERO records seen (QEMU's ram.normal and ram.duplicate). */
  pageRecords: number;
  zeroRecords: number;
  /** Distinct pages that got a PAGE or ZERO record: the rest of the records are re-sends. */
  coveredPages: number;
  /** Pages of all RAM blocks (from MEM_SIZE). */
  totalPages: number;
  /** XBZRLE records applied (QEMU's xbzrle-cache.pages, less the pages it skipped). */
  xbzrleRecords: number;
  /** Compressed pages inflated (QEMU 7.2's compression.pages). */
  compressedRecords: number;
  ramSectionOffset: number;
  leaderLength: number;
  deviceStateLength: number;
  sawEof: boolean;
  returnPath: boolean;
}

type Phase = 'leader' | 'ram' | 'device';

interface BlockState {
  layout: RamBlockLayout;
  /** One bit per page: set while the page holds data on disk. */
  dataBits: PageBits;
  /** One bit per page: set once the page got any record (progress: covered vs re-sent). */
  seenBits: PageBits;
}

export class SnapshotWriter extends Transform {
  private phase: Phase = 'leader';
  private readonly leader: Buffer[] = [];
  private leaderLength = 0;
  private ramSectionOffset = -1;
  private pageSize: number;
  private pageShift = 12;
  private blockStates: BlockState[] = [];
  private virtualSize = 0;
  private vmStateBase = -1;
  private deviceStateLength = 0;
  private dataPages = 0;
  private pageRecords = 0;
  private zeroRecords = 0;
  private coveredPages = 0;
  private totalPages = 0;
  private xbzrleRecords = 0;
  private compressedRecords = 0;
  /** Pushed writes not yet reported done (only kept when readPage is given): disk ranges, in push order. */
  private readonly inFlightStart: number[] = [];
  private readonly inFlightEnd: number[] = [];
  private inFlightHead = 0;
  /** An XBZRLE page waiting for an overlapping write to complete. */
  private waitingXbzrle: (() => void) | null = null;
  private sawEof = false;
  private returnPath = false;

  // The run being coalesced: contiguous pages on the virtual disk, copied
  // into one pool buffer so the image gets one plain write per run.
  private runOffset = 0;
  private runLength = 0;
  private run: Buffer | null = null;
  private readonly maxRunBytes: number;
  private readonly pool: RunBufferPool;
  private fillPage: Buffer | null = null;
  // Gather mode: the run is a list of segments over the input chunks.
  private gather: RunSink | null;
  private readonly copyRun: CopyRunSink | null;
  private runOpen = false;
  private readonly segments = new Float64Array(3 * MAX_RUN_SEGMENTS);
  private segmentCount = 0;
  private readonly segmentBuffers: Buffer[] = [];
  private zeroPage: Buffer | null = null;
  /** Stream offset of the record being stored, and of the one that opened the gathered run. */
  private recordOffset = 0;
  private runStreamOffset = 0;

  /**
   * Every stream byte before this offset has been dealt with and nothing
   * here refers to it any more (RAM records are copied, or written before
   * their run is let go; the leader is kept as one copy): the input chunks
   * holding only such bytes may be reused. It stops at the device state,
   * whose chunks are written as they are.
   */
  get releasedBefore(): number {
    const h = this.pendingHead;
    return h < this.pendingRunStarts.length ? Math.min(this.pendingRunStarts[h], this.released) : this.released;
  }

  private released = 0;
  /** Stream offsets where the pushed segment runs not yet reported by writeDone() began, in push order. */
  /** The source's machine type, from its CONFIGURATION section (null before it). */
  machineType: string | null = null;
  private pendingRunStarts: number[] = [];
  private pendingHead = 0;

  constructor(private readonly opts: SnapshotWriterOptions) {
    super({
      highWaterMark: opts.highWaterMark ?? 4 << 20,
      // A run's stream bytes, not an object's nominal size: queued runs pin
      // their input chunks, and counting them small let 700 chunks pile up.
      byteLengthWritable: (r: unknown) => {
        const rec = r as FramedRecord;
        return rec.type === 'ram-page-run' ? rec.byteLength : rec.type === 'ram-page' ? rec.data.length : 64;
      },
      byteLengthReadable: (w: unknown) => (w as BlockWrite).length,
    });
    this.pageSize = opts.pageSize ?? 4096;
    this.maxRunBytes = opts.maxRunBytes ?? 1 << 20;
    if (this.maxRunBytes < 65536 || (this.maxRunBytes & (this.maxRunBytes - 1)) !== 0) {
      throw new RangeError(`maxRunBytes must be a power of two of at least 64 KiB, got ${this.maxRunBytes}`);
    }
    this.pool = new RunBufferPool(this.maxRunBytes, undefined, opts.allocateRun);
    this.gather = opts.gather ?? (opts.segmentRuns ? (o, l, b, s, c) => this.pushSegments(o, l, b, s, c) : null);
    this.copyRun = opts.copyRun ?? null;
  }

  /** segmentRuns: the run goes down the pipeline as a segment write; its input is held until writeDone(). */
  private pushSegments(offset: number, length: number, buffers: Buffer[], segments: Float64Array, count: number): boolean {
    this.pendingRunStarts.push(this.runStreamOffset);
    this.push({ offset, length, buffers: buffers.slice(), segments: segments.slice(0, count * 3), count });
    return true;
  }

  /**
   * A write this writer pushed has completed: its run buffer may be reused.
   * Without these calls the buffers are simply left to the GC.
   */
  writeDone(w: BlockWrite): void {
    if (w.segments !== undefined) {
      if (++this.pendingHead > 1024 && this.pendingHead * 2 > this.pendingRunStarts.length) {
        this.pendingRunStarts = this.pendingRunStarts.slice(this.pendingHead);
        this.pendingHead = 0;
      }
    } else if (w.buffers.length === 1) {
      this.pool.release(w.buffers[0]);
    }
    if (this.opts.readPage && this.inFlightHead < this.inFlightStart.length) {
      // Completions come in push order (OrderedBlockWriter): the head is this write.
      this.inFlightHead++;
      if (this.inFlightHead > 1024 && this.inFlightHead * 2 > this.inFlightStart.length) {
        this.inFlightStart.splice(0, this.inFlightHead);
        this.inFlightEnd.splice(0, this.inFlightHead);
        this.inFlightHead = 0;
      }
      const waiting = this.waitingXbzrle;
      if (waiting) {
        this.waitingXbzrle = null;
        waiting();
      }
    }
  }

  summary(): SnapshotSummary {
    return {
      pageSize: this.pageSize,
      blocks: this.blockStates.map((b) => b.layout),
      virtualSize: this.virtualSize,
      dataPages: this.dataPages,
      pageRecords: this.pageRecords,
      zeroRecords: this.zeroRecords,
      coveredPages: this.coveredPages,
      totalPages: this.totalPages,
      xbzrleRecords: this.xbzrleRecords,
      compressedRecords: this.compressedRecords,
      ramSectionOffset: this.ramSectionOffset,
      leaderLength: this.leaderLength,
      deviceStateLength: this.deviceStateLength,
      sawEof: this.sawEof,
      returnPath: this.returnPath,
    };
  }

  /** The leader bytes (valid once the first RAM PART/END section was seen). */
  leaderBytes(): Buffer {
    return Buffer.concat(this.leader, this.leaderLength);
  }

  override _transform(rec: FramedRecord, cb: (err: Error | null, out?: unknown) => void): void {
    try {
      switch (rec.type) {
        case 'ram-page-run':
          this.recordOffset = rec.offset;
          this.storeRun(rec);
          // A gathered run still open refers to the input from where it began.
          if (this.phase === 'ram') this.released = this.runOpen ? Math.min(rec.offset, this.runStreamOffset) : rec.offset;
          return cb(null);
        case 'ram-page':
          this.recordOffset = rec.offset;
          this.pageRecords++;
          this.storePage(rec.block.index, rec.address, rec.data, 0);
          return cb(null);
        case 'ram-zero':
          this.zeroRecords++;
          this.storeZeroRecord(rec.block.index, rec.address, rec.fill);
          return cb(null);
        case 'ram-xbzrle':
          return this.storeXbzrle(rec, cb);
        case 'ram-compressed':
          this.storeCompressed(rec);
          return cb(null);
        case 'command':
          if (rec.command === Command.OPEN_RETURN_PATH) this.returnPath = true;
          this.opts.onCommand?.(rec.command, rec.payload, rec.offset);
          return cb(null);
        case 'ram-mem-size':
          return this.onMemSize(rec, cb);
        case 'section-start':
          if (this.phase === 'leader' && rec.idstr === 'ram') this.ramSectionOffset = this.leaderLength;
          return this.leaderOrState(rec, cb);
        case 'section-part':
        case 'section-end':
          if (this.phase === 'leader') this.endLeader(rec.offset);
          return cb(null);
        case 'section-full':
        case 'device-state':
          if (this.phase !== 'device') this.beginDeviceState(rec.offset);
          return this.leaderOrState(rec, cb);
        case 'eof':
          this.sawEof = true;
          if (this.phase !== 'device') this.beginDeviceState(rec.offset);
          return this.leaderOrState(rec, cb);
        case 'vmdescription':
          return this.leaderOrState(rec, cb);
        default:
          return this.leaderOrState(rec, cb);
      }
    } catch (err) {
      cb(err as Error);
    }
  }

  override _flush(cb: (err: Error | null) => void): void {
    try {
      if (!this.sawEof) throw new SnapshotSaveError(0, 'stream ended before its EOF token');
      this.flushRun();
      cb(null);
    } catch (err) {
      cb(err as Error);
    }
  }

  private onMemSize(rec: Extract<MigrationRecord, { type: 'ram-mem-size' }>, cb: (err: Error | null) => void): void {
    if (this.blockStates.length > 0) return cb(new SnapshotSaveError(rec.offset, 'a second MEM_SIZE record'));
    if (this.phase !== 'leader') return cb(new SnapshotSaveError(rec.offset, 'MEM_SIZE record after the RAM setup section'));
    const { blocks, virtualSize } = layoutRamBlocks(rec.blocks.map((b) => ({ id: b.id, length: b.length })));
    const pages = (len: number) => Math.ceil(len / this.pageSize);
    this.blockStates = blocks.map((layout) => ({ layout, dataBits: new PageBits(pages(layout.length)), seenBits: new PageBits(pages(layout.length)) }));
    this.totalPages = blocks.reduce((n, b) => n + pages(b.length), 0);
    this.virtualSize = virtualSize;
    this.appendLeader(rec);
    this.opts.prepareImage(virtualSize, blocks).then(
      (base) => {
        this.vmStateBase = base;
        cb(null);
      },
      (err: Error) => cb(err),
    );
  }

  private leaderOrState(rec: MigrationRecord, cb: (err: Error | null) => void): void {
    if (rec.type === 'configuration') {
      this.machineType = rec.machine;
      for (const sub of rec.subsections) {
        if (sub.name === 'configuration/capabilities' && sub.capabilities.includes('x-ignore-shared')) {
          // ram_save_setup / RAMBLOCK_FOREACH_NOT_IGNORED: pages of shared
          // (share=on) RAM blocks are never sent, and nothing in the stream
          // says which blocks those are.
          return cb(new SnapshotSaveError(rec.offset, 'the x-ignore-shared capability is not supported: QEMU leaves shared RAM out of the stream, so the snapshot would lack it (turn x-ignore-shared off)'));
        }
      }
    }
    if (rec.type === 'configuration' && rec.pageSize !== undefined) {
      if (!isValidPageSize(rec.pageSize)) return cb(new SnapshotSaveError(rec.offset, `bad page size ${rec.pageSize}`));
      this.setPageSize(rec.pageSize);
    }
    if (this.phase === 'leader') {
      this.appendLeader(rec);
    } else if (this.phase === 'device') {
      this.writeDeviceState(rec);
    } else if (rec.type !== 'ram-eos' && rec.type !== 'section-footer' && rec.type !== 'ram-multifd-flush') {
      return cb(new SnapshotSaveError(rec.offset, `unexpected ${rec.type} record among RAM sections`));
    }
    cb(null);
  }

  private setPageSize(n: number): void {
    if (n > this.maxRunBytes) throw new RangeError(`page size ${n} is larger than a run (${this.maxRunBytes})`);
    this.pageSize = n;
    this.pageShift = Math.log2(n);
  }

  private appendLeader(rec: MigrationRecord): void {
    for (const b of encodeRecord(rec)) {
      this.leader.push(b);
      this.leaderLength += b.length;
    }
  }

  override push(w: BlockWrite | null): boolean {
    if (w !== null && this.opts.readPage) {
      this.inFlightStart.push(w.offset);
      this.inFlightEnd.push(w.offset + w.length);
    }
    return super.push(w);
  }

  /**
   * An XBZRLE delta: patch the page as last written (zeros if it holds no
   * data) and store the result as an ordinary page. The old version is in
   * the open run, or on disk once no pushed write overlapping it is still
   * in flight.
   */
  private storeXbzrle(rec: RamXbzrleRecord, cb: (err: Error | null) => void): void {
    if (!this.opts.readPage) return cb(new SnapshotSaveError(rec.offset, 'XBZRLE pages need an image to read back from'));
    if (this.phase !== 'ram') return cb(new SnapshotSaveError(rec.offset, 'XBZRLE page outside the RAM sections'));
    this.recordOffset = rec.offset;
    const st = this.blockStates[rec.block.index];
    const diskOffset = st.layout.offset + rec.address;
    const page = Buffer.alloc(this.pageSize);
    const apply = (): void => {
      try {
        applyXbzrle(page, rec.delta, 0, rec.delta.length);
      } catch (err) {
        if (!(err instanceof XbzrleDecodeError)) throw err;
        throw new SnapshotSaveError(rec.offset, `bad XBZRLE delta for page 0x${rec.address.toString(16)} of block "${printable(rec.block.id, 64)}": ${err.message}`);
      }
      this.xbzrleRecords++;
      this.storePage(rec.block.index, rec.address, page, 0);
    };
    try {
      const p = this.pageOf(rec.address);
      if (!st.dataBits.has(p) || this.copyFromOpenRun(diskOffset, page)) {
        apply();
        return cb(null);
      }
    } catch (err) {
      return cb(err as Error);
    }
    const read = (): void => {
      let pending: Promise<void> | null;
      try {
        pending = this.opts.readPage!(diskOffset, page);
      } catch (err) {
        return cb(err as Error);
      }
      const done = (): void => {
        try {
          apply();
          cb(null);
        } catch (err) {
          cb(err as Error);
        }
      };
      if (pending === null) return done();
      pending.then(done, (err: Error) => cb(err));
    };
    const whenSettled = (): void => {
      if (this.overlapsInFlight(diskOffset, diskOffset + this.pageSize)) this.waitingXbzrle = whenSettled;
      else read();
    };
    whenSettled();
  }

  /** A zlib-compressed page (the compress capability of QEMU ≤ 9.0): inflated and stored as a page. */
  private storeCompressed(rec: RamCompressedRecord): void {
    if (this.phase !== 'ram') throw new SnapshotSaveError(rec.offset, 'compressed page outside the RAM sections');
    let page: Buffer;
    try {
      page = zlib.inflateSync(rec.data, { maxOutputLength: this.pageSize });
    } catch (err) {
      throw new SnapshotSaveError(rec.offset, `bad compressed page 0x${rec.address.toString(16)} of block "${printable(rec.block.id, 64)}": zlib: ${(err as Error).message}`);
    }
    if (page.length !== this.pageSize) {
      throw new SnapshotSaveError(rec.offset, `bad compressed page 0x${rec.address.toString(16)} of block "${printable(rec.block.id, 64)}": inflates to ${page.length} bytes, not a page (${this.pageSize})`);
    }
    this.recordOffset = rec.offset;
    this.compressedRecords++;
    this.storePage(rec.block.index, rec.address, page, 0);
  }

  /** The open run holds the page at diskOffset: copy it into out. */
  private copyFromOpenRun(diskOffset: number, out: Buffer): boolean {
    if (diskOffset < this.runOffset || diskOffset >= this.runOffset + this.runLength) return false;
    const at = diskOffset - this.runOffset;
    if (this.runOpen) {
      const k = (at / this.pageSize) * 3;
      this.segmentBuffers[this.segments[k]].copy(out, 0, this.segments[k + 1], this.segments[k + 1] + this.pageSize);
      return true;
    }
    if (this.run === null) return false;
    this.run.copy(out, 0, at, at + this.pageSize);
    return true;
  }

  private overlapsInFlight(start: number, end: number): boolean {
    for (let i = this.inFlightHead; i < this.inFlightStart.length; i++) {
      if (this.inFlightStart[i] < end && start < this.inFlightEnd[i]) return true;
    }
    return false;
  }

  private endLeader(offset: number): void {
    if (this.blockStates.length === 0 && this.ramSectionOffset < 0) {
      throw new SnapshotSaveError(offset, 'RAM section data before the RAM setup section');
    }
    this.phase = 'ram';
    const leader = this.leaderBytes();
    // One copy instead of views into the input, which may be reused.
    this.leader.length = 0;
    this.leader.push(leader);
    this.push({ offset: this.vmStateBase + VMSTATE_HEADER_SIZE, length: leader.length, buffers: [leader] });
  }

  private beginDeviceState(offset: number): void {
    if (this.phase === 'leader') {
      if (this.vmStateBase < 0) throw new SnapshotSaveError(offset, 'device state before the RAM block list (no ram section)');
      this.endLeader(offset);
    }
    this.flushRun();
    this.phase = 'device';
  }

  private writeDeviceState(rec: MigrationRecord): void {
    const parts = rec.type === 'device-state' ? [rec.data] : encodeRecord(rec);
    let length = 0;
    for (const p of parts) length += p.length;
    if (length === 0) return;
    const offset = this.vmStateBase + VMSTATE_HEADER_SIZE + this.leaderLength + this.deviceStateLength;
    this.deviceStateLength += length;
    this.push({ offset, length, buffers: parts });
  }

  private storeRun(run: RamPageRunRecord): void {
    const index = run.block.index;
    const { addresses, dataAt, source } = run;
    for (let i = 0; i < run.count; i++) {
      const at = dataAt[i];
      if (at >= 0) {
        this.pageRecords++;
        this.storePage(index, addresses[i], source, at);
      } else {
        this.zeroRecords++;
        this.storeZeroRecord(index, addresses[i], -1 - at);
      }
    }
  }

  private storeZeroRecord(blockIndex: number, address: number, fill: number): void {
    if (fill === 0) return this.storeZero(blockIndex, address);
    // QEMU only sends 0, but the format allows a fill byte: store it as data.
    if (this.fillPage === null || this.fillPage.length !== this.pageSize || this.fillPage[0] !== fill) {
      this.fillPage = Buffer.alloc(this.pageSize, fill);
    }
    this.storePage(blockIndex, address, this.fillPage, 0);
  }

  /** A data page: `pageSize` bytes of `src` from `start`. */
  private storePage(blockIndex: number, address: number, src: Buffer, start: number): void {
    const st = this.blockStates[blockIndex];
    const page = this.pageOf(address);
    if (st.seenBits.add(page)) this.coveredPages++;
    if (st.dataBits.add(page)) this.dataPages++;
    this.putPage(st.layout.offset + address, src, start);
  }

  private storeZero(blockIndex: number, address: number): void {
    const st = this.blockStates[blockIndex];
    const page = this.pageOf(address);
    if (st.seenBits.add(page)) this.coveredPages++;
    // A page never written is already zero on disk (unallocated, or a fresh
    // cluster): nothing to do. One that holds data must be overwritten.
    if (!st.dataBits.delete(page)) return;
    this.dataPages--;
    if (this.zeroPage === null || this.zeroPage.length !== this.pageSize) this.zeroPage = Buffer.alloc(this.pageSize);
    this.putPage(st.layout.offset + address, this.zeroPage, 0);
  }

  /** The page at `diskOffset` is `pageSize` bytes of `src` from `start`: into the run. */
  private putPage(diskOffset: number, src: Buffer, start: number): void {
    // False when the sink gave up on the run before this page: copy it.
    if ((this.gather || this.copyRun) && this.gatherPage(diskOffset, src, start)) return;
    const run = this.runFor(diskOffset);
    src.copy(run, this.runLength, start, start + this.pageSize);
    this.endPage();
  }

  /** Page number of a block address (a shift while it fits 32 bits). */
  private pageOf(address: number): number {
    return address >>> 0 === address ? address >>> this.pageShift : Math.floor(address / this.pageSize);
  }

  /** The run buffer the page at `diskOffset` goes into (at runLength), ending the current run if it cannot take it. */
  private runFor(diskOffset: number): Buffer {
    if (this.run !== null && diskOffset !== this.runOffset + this.runLength) this.flushRun();
    if (this.run === null) {
      this.run = this.pool.take();
      this.runOffset = diskOffset;
      this.runLength = 0;
    }
    return this.run;
  }

  /** The page went into the run: close the run at a multiple of maxRunBytes. */
  private endPage(): void {
    this.runLength += this.pageSize;
    if ((this.runOffset + this.runLength) % this.maxRunBytes === 0) this.flushRun();
  }

  /** Gather mode: the page goes into the run as a segment; false (nothing done) if the sink gave up on the run before it. */
  private gatherPage(diskOffset: number, src: Buffer, start: number): boolean {
    if (this.runOpen && diskOffset !== this.runOffset + this.runLength) this.flushRun();
    let index = this.segmentBuffers.length - 1;
    if (this.runOpen && (this.segmentCount === MAX_RUN_SEGMENTS || (this.segmentBuffers[index] !== src && index + 1 === MAX_RUN_BUFFERS))) {
      this.flushRun();
    }
    if (!this.gather && !this.copyRun) return false;
    if (!this.runOpen) {
      this.runOpen = true;
      this.runStreamOffset = this.recordOffset;
      this.runOffset = diskOffset;
      this.runLength = 0;
      this.segmentCount = 0;
      this.segmentBuffers.length = 0;
      index = -1;
    }
    if (index < 0 || this.segmentBuffers[index] !== src) index = this.segmentBuffers.push(src) - 1;
    const k = this.segmentCount++ * 3;
    this.segments[k] = index;
    this.segments[k + 1] = start;
    this.segments[k + 2] = this.pageSize;
    this.endPage();
    return true;
  }

  private flushRun(): void {
    if (this.runOpen) return this.flushGatheredRun();
    const run = this.run;
    if (run === null) return;
    this.run = null;
    if (this.runLength === 0) return this.pool.release(run);
    this.push({ offset: this.runOffset, length: this.runLength, buffers: [run.subarray(0, this.runLength)] });
    this.runLength = 0;
  }

  private flushGatheredRun(): void {
    this.runOpen = false;
    const length = this.runLength;
    const buffers = this.segmentBuffers;
    this.runLength = 0;
    if (length === 0) return;
    if (this.gather?.(this.runOffset, length, buffers, this.segments, this.segmentCount)) {
      buffers.length = 0;
      return;
    }
    // The sink cannot take it: copy this run, and go on copying (a later
    // run written now could overtake this one, still queued).
    this.gather = null;
    const copy = this.pool.take().subarray(0, length);
    if (this.copyRun) this.copyRun(this.runOffset, length, copy, buffers, this.segments, this.segmentCount);
    else copySegmentsInto(copy, buffers, this.segments, this.segmentCount);
    buffers.length = 0;
    this.push({ offset: this.runOffset, length, buffers: [copy] });
  }
}
