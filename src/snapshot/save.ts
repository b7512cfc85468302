// The save pipeline: migration stream bytes → snapshot image, atomically.
//
//   input ─▶ MigrationFramer ─▶ SnapshotWriter ─▶ OrderedBlockWriter ─▶ Qcow2Image
//
// The image is built in a temporary file beside the target and linked into
// place only after the stream ended cleanly, the metadata is flushed and the
// file is fsynced. On Linux that file has no name (O_TMPFILE) until linkat
// gives it the target's: a save killed outright leaves nothing. Elsewhere it
// is a named temporary, removed on any failure, and a later save into the
// same directory removes those whose owner died.
import * as fs from 'node:fs';
import { promises as fsp, constants as fsc } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { pumpAsync } from '../util/pump';
import { OrderedBlockWriter, BlockWriteTarget, BlockWrite } from '../blockio';
import { DEFAULT_MAX_IN_FLIGHT } from '../blockio/ordered-writer';
import { Qcow2Image } from '../image';
import { MigrationFramer } from '../migration/framer';
import type { MultifdMerger } from '../migration/multifd-merger';
import { Command } from '../migration/constants';
import { encodePong, encodeShut, encodeSwitchoverAck, sourceKnowsSwitchoverAck } from '../migration/return-path';
import { QemuSnapError } from '../errors';
import { InputGate } from './input-gate';
import { SnapshotWriter, SnapshotSummary } from './snapshot-writer';
import { RamBlockLayout } from './layout';
import { SAVE_DIGEST_ALGORITHM } from './digests';
import { finishSnapshotImage } from './finish';
import { ChunkTracker } from './chunk-tracker';
import { copySegmentsInto } from './run-buffers';
import { createChunkHasher } from './chunk-hash';
import { native } from '../util/native';
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
  /** Every ~50 ms: stream bytes, PAGE records, and what the writer knows (RAM covered, re-sends). */
  onProgress?(bytes: number, pages: number, summary: SnapshotSummary): void;
  /**
   * Called once the image file is open (or failed to open), which needs
   * none of the stream: a caller that decides when its source starts
   * sending (save over QMP) waits for this first.
   */
  onFileOpen?(): void;
  /** Record RAM digests (default true). */
  digests?: boolean;
  /** Aborting fails the save (SIGINT/SIGTERM): nothing is left behind. */
  signal?: AbortSignal;
  /** Refuse a stream whose RAM blocks add up to more than this many bytes (the RFC's -s/--image-size). */
  maxRamSize?: number;
  /**
   * Host cache mode, QEMU's meanings (default writeback): none and
   * directsync write guest RAM with O_DIRECT through the block ring,
   * writethrough and directsync with O_DSYNC, unsafe never fsyncs (the
   * image is still published atomically, by rename).
   */
  cache?: CacheMode;
  /**
   * I/O engine for the O_DIRECT guest RAM writes (default threads): native
   * is Linux AIO, io_uring io_uring, each with at most maxInFlight requests
   * in the kernel; both need cache none or directsync.
   */
  aio?: AioMode;
  /**
   * multifd: the channels' pages join the main stream's records here, in
   * sync-point order (MultifdMerger), before the one SnapshotWriter and ring.
   */
  multifd?: MultifdMerger;
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

/**
 * The OrderedBlockWriter target of a save: SnapshotWriter addresses RAM below
 * the image's vmStateOffset and the leader and device state above it; this
 * sends the first to the virtual disk, the rest to QCOW2's VM state area.
 * Set `image` (and optionally a digest `tracker`) once the image exists.
 */
export class ImageBlockTarget implements BlockWriteTarget {
  image: Qcow2Image | null = null;
  tracker: ChunkTracker | null = null;
  /** Background fdatasync as data accumulates (writeback mode only: the others have nothing dirty worth it, or must not sync). */
  backgroundSync = true;
  /** RAM runs are digested by copyRun() as they are copied, not by writev(). */
  digestsAtCopy = false;
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

  /**
   * Copies a RAM run into the run buffer it is written from, digesting it
   * on the way (SnapshotWriter's copyRun, under O_DIRECT): one pass over
   * the bytes for both instead of a copy and then a digest at writev().
   * Set digestsAtCopy when the writer copies every RAM run through here.
   */
  copyRun(offset: number, length: number, into: Buffer, buffers: Buffer[], segments: Float64Array, count: number): void {
    if (this.digestsAtCopy && this.tracker) this.tracker.copySegments(offset, length, into, buffers, segments, count);
    else copySegmentsInto(into, buffers, segments, count);
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
    if (!this.digestsAtCopy) this.tracker?.write(offset, buffers);
    return image.writev(offset, buffers);
  }
}

/** Bytes of copied runs queued before the ring, and in its writable, under O_DIRECT. */
const DIRECT_QUEUE_BYTES = 1 << 20;

export async function saveSnapshot(input: NodeJS.ReadableStream, imagePath: string, opts: SaveOptions = {}): Promise<SaveResult> {
  const target = path.resolve(imagePath);
  if (!opts.force && (await exists(target))) {
    throw new SaveTargetError(`${imagePath}: already exists (use --force to replace it)`);
  }
  const dir = path.dirname(target);
  await checkDirectory(path.dirname(imagePath), imagePath);
  const tmpPath = tempName(target);
  // The open image file: unnamed (tmpPath null) or named tmpPath.
  let file: ImageFile | null = null;
  const policy = cachePolicy(opts.cache);
  const what = `save --cache=${policy.mode}`;
  checkAioMode(opts.aio ?? 'threads', policy, 'save');
  // Direct I/O is tried on a probe file first: a file system without it
  // (tmpfs) is refused before any of the stream is read, nothing left behind.
  const dioMemAlign = policy.direct ? probeDirect(tmpPath, what, imagePath) : 0;
  const blockTarget = new ImageBlockTarget();
  blockTarget.backgroundSync = policy.mode === 'writeback';
  let dataFile: DirectFile | null = null;
  // Resolves once the temporary image exists (or failed to): a stream that
  // fails while it is being created must not unlink before it appears.
  let creating: Promise<Qcow2Image | null> | null = null;
  // The file does not wait for the stream: opened (and stale temporaries
  // cleared) once the RAM block list had come, it cost ~50 ms during which
  // QEMU sat on a full socket. Its error is reported where it is awaited.
  // A source that starts only when told to can wait for it (onFileOpen): a
  // file opened while the first megabytes are parsed waits behind them.
  const opening = openImageFile(dir, tmpPath, policy.dsync ? fsc.O_DSYNC : 0).then((f) => (file = f));
  opening.then(
    () => opts.onFileOpen?.(),
    () => opts.onFileOpen?.(),
  );

  let returnPathOpen = false;
  const framer = new MigrationFramer({
    pageSize: opts.pageSize,
    pageRuns: true,
    // QEMU's VMDESCRIPTION is the last thing it sends before it waits for
    // SHUT: end the input now rather than after the quiet period below.
    // (The framer only sees bytes through the gate, made below.)
    onQemuTail: () => {
      if (returnPathOpen) gate.finish();
    },
  });
  const hasher = opts.digests === false ? null : await createChunkHasher(SAVE_DIGEST_ALGORITHM);
  // Runs are written straight from the input chunks when the native module
  // can (pwritev, and XXH64 over the same pieces).
  // Under O_DIRECT, runs are copied into aligned buffers and written through the ring.
  const gather = !policy.direct && native() !== null && (hasher === null || hasher.updateSegments !== undefined);
  // Under O_DIRECT every RAM run is copied into aligned memory, in one
  // call per run, digested as it is copied.
  blockTarget.digestsAtCopy = policy.direct;
  const writer = new SnapshotWriter({
    pageSize: opts.pageSize,
    allocateRun: policy.direct ? alignedAllocator(dioMemAlign) : undefined,
    copyRun: policy.direct ? (o, l, into, b, sg, c) => blockTarget.copyRun(o, l, into, b, sg, c) : undefined,
    // Copied runs are the memory under O_DIRECT: queue one before the ring, not four.
    highWaterMark: policy.direct ? DIRECT_QUEUE_BYTES : undefined,
    segmentRuns: gather,
    prepareImage: async (virtualSize: number, blocks: RamBlockLayout[]) => {
      const ram = blocks.reduce((sum, b) => sum + b.length, 0);
      if (opts.maxRamSize !== undefined && ram > opts.maxRamSize) {
        throw new SaveTargetError(`the stream's guest RAM (${ram} bytes in ${blocks.length} blocks) is larger than the image size limit of ${opts.maxRamSize} bytes (-s/--image-size)`);
      }
      // Messages name the image the user asked for, not a hidden temporary.
      // Nothing is written until finishSnapshotImage flushes: the file is
      // published only after that, and the stream's writes wait for no I/O.
      const created = opening.then((f) => Qcow2Image.create(imagePath, { virtualSize, clusterSize: opts.clusterSize, file: f.fh, deferFlush: true }));
      creating = created.catch(() => null);
      const image = await created;
      if (policy.direct) {
        // Guest RAM through a second, O_DIRECT descriptor; metadata and the
        // VM state (small, unaligned) through the image's buffered one.
        // An unnamed file is reopened through /proc: a new open file description with its own flags.
        const named = (file as ImageFile | null)?.tmpPath ?? `/proc/self/fd/${(file as ImageFile | null)?.fh.fd ?? -1}`;
        dataFile = openDirect(named, fsc.O_RDWR | (policy.dsync ? fsc.O_DSYNC : 0), what, imagePath, {
          aio: opts.aio ?? 'threads',
          maxInFlight: opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
        });
        image.setDataFile(dataFile);
      }
      blockTarget.image = image;
      if (hasher) blockTarget.tracker = new ChunkTracker(image, virtualSize, hasher);
      return image.vmStateOffset;
    },
    // XBZRLE pages patch the page as last written; the writer waits for any
    // write of it still in the ring before it asks.
    readPage: (offset, out) => {
      const image = blockTarget.image;
      if (!image) return Promise.reject(new SaveTargetError('XBZRLE page before the image exists'));
      return image.readIntoSync(offset, out.length, out) ? null : image.readInto(offset, out.length, out);
    },
    onCommand: (command, payload) => {
      if (command === Command.OPEN_RETURN_PATH) {
        returnPathOpen = true;
        if (opts.returnPath && sourceKnowsSwitchoverAck(writer.machineType)) opts.returnPath.write(encodeSwitchoverAck());
      }
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
  // Under O_DIRECT every queued or finished-but-unreported write holds a
  // 1 MiB aligned copy: a short queue, and no more slots than writes in
  // flight (measured: peak 20-22 copies, 112-121 MiB RSS -> 10-12 copies,
  // 98-106 MiB, no slower; 1 GiB pipe save).
  const ring = new OrderedBlockWriter(blockTarget, {
    maxInFlight: opts.maxInFlight,
    highWaterMark: policy.direct ? DIRECT_QUEUE_BYTES : undefined,
    ringSize: policy.direct ? (opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT) : undefined,
    onComplete: (w) => writer.writeDone(w),
  });

  // A source with a return path waits for SHUT before it closes the pipe:
  // end the input ourselves. A tail with QEMU's VMDESCRIPTION ends it at
  // once (onQemuTail above); any other complete tail once nothing more
  // came for a while.
  const quietMs = opts.quietMs ?? 300;
  const watch = setInterval(() => {
    if (opts.onProgress) {
      const summary = writer.summary();
      opts.onProgress(gate.bytes, summary.pageRecords, summary);
    }
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
    await (opts.multifd ? pumpAsync(gate, framer, opts.multifd, writer, ring) : pumpAsync(gate, framer, writer, ring));
    const image = blockTarget.image;
    if (!image) throw new SaveTargetError('stream ended before its RAM block list');
    const summary = writer.summary();
    await finishSnapshotImage(image, summary, blockTarget.tracker, { sync: policy.flush });
    const f = file as ImageFile | null;
    if (!f) throw new SaveTargetError(`${imagePath}: the image file was never opened`);
    // An unnamed file is linked while it is still open.
    if (f.tmpPath === null) await publishUnnamed(f.fh, target, opts.force === true);
    await image.close();
    (dataFile as DirectFile | null)?.close();
    blockTarget.image = null;
    if (f.tmpPath !== null) await publish(f.tmpPath, target, opts.force === true);
    if (policy.flush) await syncDirectory(target);
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
      // Settled now: `file` is set if the file was opened at all.
      await opening.catch(() => undefined);
      const named = (file as ImageFile | null)?.tmpPath;
      if (named) await fsp.unlink(named).catch(() => undefined);
      // Never opened as an image (no block list, or create failed): close the file itself.
      if (!image) await (file as ImageFile | null)?.fh.close().catch(() => undefined);
      if (returnPathOpen && opts.returnPath) opts.returnPath.write(encodeShut(1));
    }
  }
}

/** Moves the finished file into place; without force, never over an image that appeared meanwhile. */
async function publish(tmpPath: string, target: string, force: boolean): Promise<void> {
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
}

/** Makes the rename or link that published the image durable. */
async function syncDirectory(target: string): Promise<void> {
  const dirHandle = await fsp.open(path.dirname(target), fsc.O_RDONLY);
  try {
    await dirHandle.sync();
  } finally {
    await dirHandle.close();
  }
}

/** The image's file while it is built: unnamed (O_TMPFILE) when tmpPath is null. */
interface ImageFile {
  fh: FileHandle;
  tmpPath: string | null;
}

/** open(2)'s O_TMPFILE on Linux (x86, arm, riscv...): __O_TMPFILE | O_DIRECTORY. */
const O_TMPFILE = 0o20000000 | 0o200000;
const TEMP_NAME = /^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$/;
/** A named temporary untouched this long, whose owner pid is gone, is left over from a killed save. */
const STALE_TEMP_MS = 10_000;

function tempName(target: string): string {
  return path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
}

/**
 * An unnamed file in `dir` where the file system and the native module
 * (for linkat) allow it, else the named temporary `tmpPath`, after removing
 * stale ones. QEMU_SNAP_TMPFILE=0 forces the named temporary.
 */
async function openImageFile(dir: string, tmpPath: string, openFlags = 0): Promise<ImageFile> {
  await removeStaleTemps(dir);
  if (process.platform === 'linux' && native() && process.env.QEMU_SNAP_TMPFILE !== '0') {
    try {
      return { fh: await fsp.open(dir, O_TMPFILE | fsc.O_RDWR | openFlags, 0o666), tmpPath: null };
    } catch (err) {
      // Not supported here (old kernels say EISDIR): fall back.
      if (!['EOPNOTSUPP', 'EISDIR', 'EINVAL'].includes(String((err as NodeJS.ErrnoException).code))) throw err;
    }
  }
  return { fh: await fsp.open(tmpPath, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | openFlags, 0o666), tmpPath };
}

/** Removes named temporaries of earlier saves whose process is gone (SIGKILL, a crash, power loss). */
async function removeStaleTemps(dir: string): Promise<void> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch {
    return;
  }
  for (const name of names) {
    const m = TEMP_NAME.exec(name);
    if (!m || Number(m[1]) === process.pid || processAlive(Number(m[1]))) continue;
    const p = path.join(dir, name);
    try {
      const st = await fsp.lstat(p);
      if (st.isFile() && Date.now() - st.mtimeMs > STALE_TEMP_MS) await fsp.unlink(p);
    } catch {
      // gone meanwhile, or not ours to remove
    }
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Names the unnamed file: linkat at the target, which fails if the target
 * appeared meanwhile (another save won the race); with force, linkat at a
 * fresh temporary name and rename over the target, so a concurrent load
 * opens the old image or the new one, whole.
 */
async function publishUnnamed(fh: FileHandle, target: string, force: boolean): Promise<void> {
  const mod = native();
  if (!mod) throw new SaveTargetError(`${target}: an unnamed image file needs the native module to be linked`);
  if (!force) {
    try {
      mod.linkFd(fh.fd, target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new SaveTargetError(`${target}: already exists (another save finished first; use --force to replace it)`);
      }
      throw err;
    }
    return;
  }
  const side = tempName(target);
  mod.linkFd(fh.fd, side);
  try {
    await fsp.rename(side, target);
  } catch (err) {
    await fsp.unlink(side).catch(() => undefined);
    throw err;
  }
}

/** The directory IMAGE goes into must exist: say so naming it as typed. */
async function checkDirectory(typedDir: string, imagePath: string): Promise<void> {
  try {
    const st = await fsp.stat(typedDir);
    if (!st.isDirectory()) throw new SaveTargetError(`${typedDir}: not a directory (for IMAGE ${imagePath})`);
  } catch (err) {
    if (err instanceof SaveTargetError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new SaveTargetError(`${typedDir}: no such directory (for IMAGE ${imagePath})`);
    if (code === 'ENOTDIR') throw new SaveTargetError(`${typedDir}: not a directory (for IMAGE ${imagePath})`);
    throw err;
  }
}

/**
 * Refuses a cache mode or I/O engine this image's directory or this build
 * cannot do, as saveSnapshot would, before any stream exists (save --qmp
 * checks before it touches QEMU).
 */
export function checkSaveCache(imagePath: string, cache?: CacheMode, aio?: AioMode): void {
  const policy = cachePolicy(cache);
  const what = `save --cache=${policy.mode}`;
  checkAioMode(aio ?? 'threads', policy, 'save');
  if (policy.direct) probeDirect(tempName(path.resolve(imagePath)), what, imagePath);
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
