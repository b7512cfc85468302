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
import type { MigrationRecord } from '../migration/records';
import { Command } from '../migration/constants';
import { QemuSnapError } from '../errors';
import { layoutRamBlocks, RamBlockLayout, VMSTATE_HEADER_SIZE, isValidPageSize } from './layout';

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
  /** Largest coalesced write, in bytes. */
  maxRunBytes?: number;
}

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
  dataBits: Uint8Array;
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
  private sawEof = false;
  private returnPath = false;

  // The run being coalesced: contiguous pages on the virtual disk.
  private runOffset = 0;
  private runLength = 0;
  private runBuffers: Buffer[] = [];
  private readonly maxRunBytes: number;
  private zeroPage: Buffer;

  constructor(private readonly opts: SnapshotWriterOptions) {
    super({
      highWaterMark: 4 << 20,
      byteLengthWritable: (r: unknown) => ((r as MigrationRecord).type === 'ram-page' ? 4096 : 64),
      byteLengthReadable: (w: unknown) => (w as BlockWrite).length,
    });
    this.pageSize = opts.pageSize ?? 4096;
    this.maxRunBytes = opts.maxRunBytes ?? 1 << 20;
    this.zeroPage = Buffer.alloc(this.pageSize);
  }

  summary(): SnapshotSummary {
    return {
      pageSize: this.pageSize,
      blocks: this.blockStates.map((b) => b.layout),
      virtualSize: this.virtualSize,
      dataPages: this.dataPages,
      pageRecords: this.pageRecords,
      zeroRecords: this.zeroRecords,
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

  override _transform(rec: MigrationRecord, cb: (err: Error | null, out?: unknown) => void): void {
    try {
      switch (rec.type) {
        case 'ram-page':
          this.pageRecords++;
          this.storePage(rec.block.index, rec.address, rec.data);
          return cb(null);
        case 'ram-zero':
          this.zeroRecords++;
          if (rec.fill !== 0) {
            // QEMU only sends 0, but the format allows a fill byte: store it as data.
            this.storePage(rec.block.index, rec.address, Buffer.alloc(this.pageSize, rec.fill));
          } else {
            this.storeZero(rec.block.index, rec.address);
          }
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
    this.blockStates = blocks.map((layout) => ({ layout, dataBits: new Uint8Array(Math.ceil(pages(layout.length) / 8)) }));
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
    this.pageSize = n;
    this.pageShift = Math.log2(n);
    if (this.zeroPage.length !== n) this.zeroPage = Buffer.alloc(n);
  }

  private appendLeader(rec: MigrationRecord): void {
    for (const b of encodeRecord(rec)) {
      this.leader.push(b);
      this.leaderLength += b.length;
    }
  }

  override push(w: BlockWrite | null): boolean {
    return super.push(w);
  }

  private endLeader(offset: number): void {
    if (this.blockStates.length === 0 && this.ramSectionOffset < 0) {
      throw new SnapshotSaveError(offset, 'RAM section data before the RAM setup section');
    }
    this.phase = 'ram';
    const leader = this.leaderBytes();
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

  private storePage(blockIndex: number, address: number, data: Buffer): void {
    const st = this.blockStates[blockIndex];
    const page = this.pageOf(address);
    const bit = 1 << (page & 7);
    const byte = page >>> 3;
    if ((st.dataBits[byte] & bit) === 0) {
      st.dataBits[byte] |= bit;
      this.dataPages++;
    }
    this.addToRun(st.layout.offset + address, data);
  }

  private storeZero(blockIndex: number, address: number): void {
    const st = this.blockStates[blockIndex];
    const page = this.pageOf(address);
    const bit = 1 << (page & 7);
    const byte = page >>> 3;
    // A page never written is already zero on disk (unallocated, or a fresh
    // cluster): nothing to do. One that holds data must be overwritten.
    if ((st.dataBits[byte] & bit) === 0) return;
    st.dataBits[byte] &= ~bit;
    this.dataPages--;
    this.addToRun(st.layout.offset + address, this.zeroPage);
  }

  /** Page number of a block address (a shift while it fits 32 bits). */
  private pageOf(address: number): number {
    return address >>> 0 === address ? address >>> this.pageShift : Math.floor(address / this.pageSize);
  }

  private addToRun(diskOffset: number, data: Buffer): void {
    if (this.runLength > 0 && (diskOffset !== this.runOffset + this.runLength || this.runLength + data.length > this.maxRunBytes)) {
      this.flushRun();
    }
    if (this.runLength === 0) this.runOffset = diskOffset;
    this.runBuffers.push(data);
    this.runLength += data.length;
  }

  private flushRun(): void {
    if (this.runLength === 0) return;
    this.push({ offset: this.runOffset, length: this.runLength, buffers: this.runBuffers });
    this.runBuffers = [];
    this.runLength = 0;
  }
}
