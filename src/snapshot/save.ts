// The save pipeline: migration stream bytes → snapshot image, atomically.
//
//   input ─▶ MigrationFramer ─▶ SnapshotWriter ─▶ OrderedBlockWriter ─▶ Qcow2Image
//
// The image is built in a temporary file beside the target and linked into
// place only after the stream ended cleanly, the metadata is flushed and the
// file is fsynced. On any failure the temporary file is removed.
import * as fs from 'node:fs';
import { promises as fsp, constants as fsc } from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { pumpAsync } from '../util/pump';
import { OrderedBlockWriter, BlockWriteTarget, BlockWrite } from '../blockio';
import { Qcow2Image } from '../image';
import { MigrationFramer } from '../migration/framer';
import { Command } from '../migration/constants';
import { encodePong, encodeShut } from '../migration/return-path';
import { QemuSnapError } from '../errors';
import { InputGate } from './input-gate';
import { SnapshotWriter, SnapshotSummary } from './snapshot-writer';
import { encodeSnapshotHeader, RamBlockLayout, VMSTATE_HEADER_SIZE } from './layout';
import { DIGEST_CHUNK_SIZE, encodeDigestTable, SAVE_DIGEST_ALGORITHM } from './digests';
import { ChunkTracker } from './chunk-tracker';
import { createChunkHasher } from './chunk-hash';
import { native } from '../util/native';
import * as zlib from 'node:zlib';
import { AioMode, CacheMode, DirectFile, alignedAllocator, cachePolicy, checkAioMode, openDirect } from '../util/direct-io';

export class SaveTargetError extends QemuSnapError {}

/** Data written between two background fdatasync calls. */
const WRITEBACK_BYTES = 64 << 20;

export interface SaveOptions {
  clusterSize?: number;
  /** Page size when the stream does not say (default 4096). */
  pageSize?: number;
  maxInFlight?: number;
  /** Replace an existing image. */
  force?: boolean;
  /**
   * Where return-path messages go (our stdout when run by QEMU's exec:).
   * Without it, a source that opens a return path is never answered.
   */
  returnPath?: NodeJS.WritableStream;
  /** How long the input must be quiet, with a complete tail, before a return-path source is deemed done. */
  quietMs?: number;
  onProgress?(bytes: number, pages: number): void;
  /** Record RAM digests (default true). */
  digests?: boolean;
  /** Aborting fails the save (SIGINT/SIGTERM): nothing is left behind. */
  signal?: AbortSignal;
  /**
   * Host cache mode, QEMU's meanings (default writeback): none and
   * directsync write guest RAM with O_DIRECT through the block ring,
   * writethrough and directsync with O_DSYNC, unsafe never fsyncs (the
   * image is still published atomically, by rename).
   */
  cache?: CacheMode;
  /** I/O engine (default threads, the only one built in). */
  aio?: AioMode;
}

export class SaveAbortedError extends QemuSnapError {}

/** An input that can take back chunks it produced (FdReader). */
interface RecyclingInput {
  recycle(chunk: Buffer): boolean;
}

function isRecycling(input: unknown): input is RecyclingInput {
  return typeof (input as Partial<RecyclingInput>).recycle === 'function';
}

/**
 * Input chunks in stream order, handed back to the reader once the writer
 * is past them: the reader thread then fills the same memory again instead
 * of faulting in fresh pages (0.1-0.15 s of system time per GiB).
 */
class InputRecycler {
  private chunks: Buffer[] = [];
  private ends: number[] = [];
  private head = 0;

  constructor(private readonly input: RecyclingInput) {}

  add(chunk: Buffer, end: number): void {
    this.chunks.push(chunk);
    this.ends.push(end);
  }

  /** Recycles the chunks that end at or before `offset`. */
  releaseBefore(offset: number): void {
    while (this.head < this.ends.length && this.ends[this.head] <= offset) {
      this.input.recycle(this.chunks[this.head]);
      this.chunks[this.head] = EMPTY;
      this.head++;
    }
    if (this.head > 1024 && this.head * 2 > this.ends.length) {
      this.chunks = this.chunks.slice(this.head);
      this.ends = this.ends.slice(this.head);
      this.head = 0;
    }
  }
}

const EMPTY = Buffer.alloc(0);

export interface SaveResult extends SnapshotSummary {
  imagePath: string;
  streamBytes: number;
}

/** Writes blocks below the virtual size to the disk, the rest to the VM state area. */
class ImageBlockTarget implements BlockWriteTarget {
  image: Qcow2Image | null = null;
  tracker: ChunkTracker | null = null;
  /** Background fdatasync as data accumulates (writeback mode only: the others have nothing dirty worth it, or must not sync). */
  backgroundSync = true;
  private unsynced = 0;
  private syncing = false;

  /**
   * The final fsync would wait for every byte still dirty in the page cache:
   * push data to the disk in the background as it accumulates instead.
   */
  private writeback(image: Qcow2Image, length: number): void {
    if (!this.backgroundSync) return;
    this.unsynced += length;
    if (this.syncing || this.unsynced < WRITEBACK_BYTES) return;
    this.syncing = true;
    this.unsynced = 0;
    image.writeback().then(
      () => (this.syncing = false),
      () => (this.syncing = false), // the final flush reports real errors
    );
  }

  /**
   * A RAM run written now from the input's own buffers (SnapshotWriter's
   * gather mode): no copy into a run buffer and no thread hop per write,
   * ~0.27 CPU-s per GiB on the bench VM. False when the image or the
   * digests need the queued path.
   */
  writeSegmentsSync(offset: number, length: number, buffers: Buffer[], segments: Float64Array, count: number): boolean {
    const image = this.image;
    if (!image || offset + length > image.vmStateOffset) return false;
    if (this.tracker && !this.tracker.acceptsSegments(offset, length)) return false;
    if (!image.writeSegmentsSync(offset, length, buffers, segments, count)) return false;
    this.tracker?.writeSegments(offset, length, buffers, segments, count);
    this.writeback(image, length);
    return true;
  }

  writeSync(w: BlockWrite): boolean {
    return w.segments !== undefined && this.writeSegmentsSync(w.offset, w.length, w.buffers, w.segments, w.count ?? 0);
  }

  writev(offset: number, buffers: Buffer[]): Promise<void> {
    const image = this.image;
    if (!image) return Promise.reject(new SaveTargetError('block write before the image exists'));
    if (offset >= image.vmStateOffset) {
      const data = buffers.length === 1 ? buffers[0] : Buffer.concat(buffers);
      return image.writeVmState(offset - image.vmStateOffset, data);
    }
    let length = 0;
    for (const b of buffers) length += b.length;
    this.writeback(image, length);
    this.tracker?.write(offset, buffers);
    return image.writev(offset, buffers);
  }
}

export async function saveSnapshot(input: NodeJS.ReadableStream, imagePath: string, opts: SaveOptions = {}): Promise<SaveResult> {
  const target = path.resolve(imagePath);
  if (!opts.force && (await exists(target))) {
    throw new SaveTargetError(`${imagePath}: already exists (use --force to replace it)`);
  }
  const dir = path.dirname(target);
  const tmpPath = path.join(dir, `.${path.basename(target)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const policy = cachePolicy(opts.cache);
  const what = `save --cache=${policy.mode}`;
  checkAioMode(opts.aio ?? 'threads');
  // Direct I/O is tried on a probe file first: a file system without it
  // (tmpfs) is refused before any of the stream is read, nothing left behind.
  const dioMemAlign = policy.direct ? probeDirect(tmpPath, what, imagePath) : 0;
  const blockTarget = new ImageBlockTarget();
  blockTarget.backgroundSync = policy.mode === 'writeback';
  let dataFile: DirectFile | null = null;
  // Resolves once the temporary image exists (or failed to): a stream that
  // fails while it is being created must not unlink before it appears.
  let creating: Promise<Qcow2Image | null> | null = null;

  const framer = new MigrationFramer({ pageSize: opts.pageSize, pageRuns: true });
  const hasher = opts.digests === false ? null : await createChunkHasher(SAVE_DIGEST_ALGORITHM);
  let returnPathOpen = false;
  // Runs are written straight from the input chunks when the native module
  // can (pwritev, and XXH64 over the same pieces).
  // Under O_DIRECT, runs are copied into aligned buffers and written through the ring.
  const gather = !policy.direct && native() !== null && (hasher === null || hasher.updateSegments !== undefined);
  const writer = new SnapshotWriter({
    pageSize: opts.pageSize,
    allocateRun: policy.direct ? alignedAllocator(dioMemAlign) : undefined,
    segmentRuns: gather,
    prepareImage: async (virtualSize: number, _blocks: RamBlockLayout[]) => {
      const created = Qcow2Image.create(tmpPath, { virtualSize, clusterSize: opts.clusterSize, openFlags: policy.dsync ? fsc.O_DSYNC : 0 });
      creating = created.catch(() => null);
      const image = await created;
      if (policy.direct) {
        // Guest RAM through a second, O_DIRECT descriptor; metadata and the
        // VM state (small, unaligned) through the image's buffered one.
        dataFile = openDirect(tmpPath, fsc.O_RDWR | (policy.dsync ? fsc.O_DSYNC : 0), what, imagePath);
        image.setDataFile(dataFile);
      }
      blockTarget.image = image;
      if (hasher) blockTarget.tracker = new ChunkTracker(image, virtualSize, hasher);
      return image.vmStateOffset;
    },
    onCommand: (command, payload) => {
      if (command === Command.OPEN_RETURN_PATH) returnPathOpen = true;
      if (command === Command.PING && returnPathOpen && opts.returnPath) {
        opts.returnPath.write(encodePong(payload.length >= 4 ? payload.readUInt32BE(0) : 0));
      }
    },
  });
  const recycler = isRecycling(input) ? new InputRecycler(input) : null;
  const gate = new InputGate(
    input,
    recycler
      ? (chunk, end) => {
          recycler.releaseBefore(writer.releasedBefore);
          recycler.add(chunk, end);
        }
      : undefined,
  );
  const ring = new OrderedBlockWriter(blockTarget, { maxInFlight: opts.maxInFlight, onComplete: (w) => writer.writeDone(w) });

  // A source with a return path waits for SHUT before it closes the pipe:
  // end the input ourselves once what arrived is a complete stream and
  // nothing more came for a while.
  const quietMs = opts.quietMs ?? 300;
  const watch = setInterval(() => {
    opts.onProgress?.(gate.bytes, writer.summary().pageRecords);
    if (!returnPathOpen) return;
    const quiet = Date.now() - gate.lastDataAt;
    if (quiet < quietMs) return;
    const tail = framer.completeTail();
    // A stream ending at EOF may still get its VMDESCRIPTION: wait longer for
    // that (a machine with suppress-vmdesc sends none).
    if (tail === 'vmdescription' || (tail === 'eof' && quiet >= quietMs * 10)) gate.finish();
  }, 50);

  const onAbort = () => gate.destroy(new SaveAbortedError(`save interrupted (${String(opts.signal?.reason ?? 'aborted')}) after ${gate.bytes} bytes of stream`));
  if (opts.signal?.aborted) onAbort();
  opts.signal?.addEventListener('abort', onAbort);

  let ok = false;
  try {
    await pumpAsync(gate, framer, writer, ring);
    const image = blockTarget.image;
    if (!image) throw new SaveTargetError('stream ended before its RAM block list');
    const summary = writer.summary();
    const stateLength = summary.leaderLength + summary.deviceStateLength;
    await image.writeVmState(
      0,
      encodeSnapshotHeader({
        pageSize: summary.pageSize,
        dataPages: summary.dataPages,
        ramSectionOffset: summary.ramSectionOffset,
        leaderLength: summary.leaderLength,
        stateLength,
      }),
    );
    if (blockTarget.tracker) {
      const chunks = await blockTarget.tracker.finish();
      const stateCrc = zlib.crc32(await image.readVmState(VMSTATE_HEADER_SIZE, stateLength));
      await image.writeVmState(VMSTATE_HEADER_SIZE + stateLength, encodeDigestTable({ algorithm: SAVE_DIGEST_ALGORITHM, chunkSize: DIGEST_CHUNK_SIZE, stateCrc, chunks }));
    }
    // One fsync covers both descriptors: it is the inode's.
    await image.flush({ sync: policy.flush });
    await image.close();
    (dataFile as DirectFile | null)?.close();
    blockTarget.image = null;
    await publish(tmpPath, target, opts.force === true, policy.flush);
    ok = true;
    if (returnPathOpen && opts.returnPath) opts.returnPath.write(encodeShut(0));
    return { ...summary, imagePath: target, streamBytes: gate.bytes };
  } finally {
    clearInterval(watch);
    opts.signal?.removeEventListener('abort', onAbort);
    if (!ok) {
      gate.destroy();
      // Assigned in a callback: TypeScript's narrowing cannot see it.
      const pending = creating as Promise<Qcow2Image | null> | null;
      const image = pending ? await pending : null;
      if (image) await image.close().catch(() => undefined);
      try {
        (dataFile as DirectFile | null)?.close();
      } catch {
        // closing is all that is left to do with it
      }
      if (pending) await fsp.unlink(tmpPath).catch(() => undefined);
      if (returnPathOpen && opts.returnPath) opts.returnPath.write(encodeShut(1));
    }
  }
}

/** Moves the finished file into place; without force, never over an image that appeared meanwhile. */
async function publish(tmpPath: string, target: string, force: boolean, sync = true): Promise<void> {
  if (force) {
    await fsp.rename(tmpPath, target);
  } else {
    try {
      await fsp.link(tmpPath, target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new SaveTargetError(`${target}: already exists (another save finished first; use --force to replace it)`);
      }
      throw err;
    }
    await fsp.unlink(tmpPath);
  }
  if (!sync) return;
  const dirHandle = await fsp.open(path.dirname(target), fsc.O_RDONLY);
  try {
    await dirHandle.sync();
  } finally {
    await dirHandle.close();
  }
}

/**
 * Creates `tmpPath`, opens it with O_DIRECT and removes it again: the
 * direct-I/O memory alignment when the file system does direct I/O, a
 * DirectIoError naming the mode and `shown` when it does not.
 */
function probeDirect(tmpPath: string, what: string, shown: string): number {
  let fd: number;
  try {
    fd = fs.openSync(tmpPath, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o600);
  } catch (err) {
    throw new SaveTargetError(`${shown}: cannot create ${tmpPath}: ${(err as Error).message}`);
  }
  try {
    fs.closeSync(fd);
    const probe = openDirect(tmpPath, fsc.O_RDWR, what, shown);
    probe.close();
    return probe.memAlign;
  } finally {
    fs.unlinkSync(tmpPath);
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await fsp.lstat(p);
    return true;
  } catch {
    return false;
  }
}
