// The load pipeline: snapshot image → migration stream for an incoming QEMU.
//
//   Qcow2Image ─▶ OrderedBlockReader ─▶ LoadEncoder ─▶ output (stdout)
//   return path (stdin) ─▶ ReturnPathParser ─▶ page requests ─▶ reader.urgent()
//
// Everything that can be checked (header, leader, offsets, page size) is
// checked before the first byte goes out.
import * as fs from 'node:fs';
import { Writable } from 'streamx';
import { pumpAsync } from '../util/pump';
import { FdWriter } from '../util/fd-writer';
import { OrderedBlockReader, ReadPlanEntry, BlockRead } from '../blockio';
import { ReturnPathParser, ReturnPathMsg } from '../migration/return-path';
import {
  encodeOpenReturnPath,
  encodePing,
  encodePostcopyAdvise,
  encodeRamDiscard,
  encodeListenPackage,
} from '../migration/postcopy';
import { Token } from '../migration/constants';
import { QemuSnapError } from '../errors';
import { InputGate } from './input-gate';
import { LoadEncoder } from './load-encoder';
import { openSnapshot, SnapshotContents } from './snapshot-image';
import { InlinePieceDigester } from './digest-pieces';
import { createChunkHasher, ChunkHasher } from './chunk-hash';
import { DigestMismatchError } from './digests';
import { DirectLoadPump } from './direct-pump';
import { RunBufferPool } from './run-buffers';
import { StreamVerifier, where } from './verify';
import { AioMode, CacheMode, DirectFile, alignedAllocator, cachePolicy, checkAioMode, openDirect } from '../util/direct-io';

export class LoadError extends QemuSnapError {}

export interface LoadOptions {
  /** Write the stream to this file instead of `stdout`. */
  output?: string;
  /** Where the stream goes when no output file is named (default process.stdout). */
  stdout?: NodeJS.WritableStream;
  /** Refuse an image whose page size differs. */
  pageSize?: number;
  maxInFlight?: number;
  /** Largest read, in bytes (default 1 MiB). */
  readSize?: number;
  /** Postcopy: switch after this percentage of the data pages. */
  postcopy?: number;
  /** The destination's return path (stdin under exec:); required for postcopy. */
  returnPath?: NodeJS.ReadableStream;
  signal?: AbortSignal;
  onProgress?(bytes: number, pages: number): void;
  /** Check RAM against the image's digests (default true when it has them). */
  verify?: boolean;
  /**
   * Host cache mode (QEMU's names; default writeback). none and directsync
   * read RAM with O_DIRECT through the ordered reader, maxInFlight reads
   * outstanding, into aligned buffers: the image's data never enters the
   * page cache. The other modes read through the page cache.
   */
  cache?: CacheMode;
  /** I/O engine (default threads, the only one built in). */
  aio?: AioMode;
  /** Postcopy milestones, for benchmarks. */
  onEvent?(name: 'switch' | 'eof' | 'shut', atMs: number): void;
}

export interface LoadResult {
  streamBytes: number;
  dataPagesSent: number;
  zeroPagesSent: number;
  /** Postcopy only: page requests served, with their latency (request → pages handed to the pipe). */
  requests?: { count: number; latenciesMs: number[] };
}

const HOLE_PIECE = 16 << 20;
/** Metadata is mapped in pieces this large, so a huge sparse image never holds all its L2 tables. */
const MAP_PIECE = 16 * 2 ** 30;
const ADVISE_PING = 1;
const PONG_TIMEOUT_MS = 30_000;
const NO_POSTCOPY_RAM =
  'the destination rejected POSTCOPY_ADVISE (it closed the stream): enable the postcopy-ram capability on it (-incoming defer, migrate-set-capabilities postcopy-ram on, then migrate-incoming)';

/** Allocated and unallocated runs of every block, in disk order (metadata loaded a piece at a time). */
async function mapBlocks(snap: SnapshotContents): Promise<Array<{ index: number; offset: number; length: number; allocated: boolean }>> {
  const ps = snap.header.pageSize;
  const out: Array<{ index: number; offset: number; length: number; allocated: boolean }> = [];
  for (let i = 0; i < snap.blocks.length; i++) {
    const b = snap.blocks[i];
    const end = b.offset + Math.ceil(b.length / ps) * ps;
    for (let o = b.offset; o < end; o += MAP_PIECE) {
      const len = Math.min(MAP_PIECE, end - o);
      await snap.image.loadMetadata(o, len);
      for (const run of snap.image.allocatedRanges(o, len)) {
        const last = out[out.length - 1];
        if (last && last.index === i && last.allocated === run.allocated && last.offset + last.length === run.offset) last.length += run.length;
        else out.push({ index: i, offset: run.offset, length: run.length, allocated: run.allocated });
      }
    }
  }
  return out;
}

/**
 * Before anything goes out: a chunk the image maps no data into reads as
 * zeros, so its digest must be the digest of zeros. Damage that unmaps data
 * (an L1 or L2 entry cleared or pointing at a table of zeros) is caught here
 * instead of in the middle of the stream.
 */
function checkUnmappedChunks(snap: SnapshotContents, runs: Array<{ offset: number; length: number; allocated: boolean }>, zeros: ChunkHasher): void {
  const table = snap.digests;
  if (!table) return;
  const cs = table.chunkSize;
  const mapped = new Uint8Array(table.chunks.length);
  for (const r of runs) {
    if (!r.allocated) continue;
    for (let c = Math.floor(r.offset / cs); c <= Math.floor((r.offset + r.length - 1) / cs); c++) mapped[c] = 1;
  }
  const size = snap.image.virtualSize;
  for (let c = 0; c < table.chunks.length; c++) {
    if (mapped[c] || table.chunks[c] === zeros.zeroChunk(Math.min(cs, size - c * cs))) continue;
    throw new DigestMismatchError(`${snap.path}: RAM digest mismatch ${where(snap, c * cs)} (chunk ${c}): the image maps no data there, but data was saved: the image is damaged`);
  }
}

/** The background plan: every page of every block, data ranges read in pieces, holes not read. */
function* buildPlan(runs: Array<{ index: number; offset: number; length: number; allocated: boolean }>, readSize: number): Generator<ReadPlanEntry> {
  for (const run of runs) {
    const piece = run.allocated ? readSize : HOLE_PIECE;
    for (let o = run.offset; o < run.offset + run.length; o += piece) {
      yield { offset: o, length: Math.min(piece, run.offset + run.length - o), hole: !run.allocated, tag: run.index };
    }
  }
}

export async function loadSnapshot(imagePath: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const policy = cachePolicy(opts.cache);
  checkAioMode(opts.aio ?? 'threads');
  // Opened first: a file system without direct I/O is refused before anything else.
  const dataFile = policy.direct ? openDirect(imagePath, fs.constants.O_RDONLY, `load --cache=${policy.mode}`) : null;
  let snap: SnapshotContents;
  try {
    snap = await openSnapshot(imagePath);
  } catch (err) {
    dataFile?.close();
    throw err;
  }
  if (dataFile) snap.image.setDataFile(dataFile);
  try {
    const ps = snap.header.pageSize;
    if (opts.pageSize !== undefined && opts.pageSize !== ps) {
      throw new LoadError(`${imagePath}: the image has ${ps}-byte pages, ${opts.pageSize} were asked for`);
    }
    const postcopy = opts.postcopy !== undefined;
    if (postcopy && !opts.returnPath) throw new LoadError('postcopy needs the destination return path on stdin');
    return await run(snap, opts, dataFile);
  } finally {
    await snap.image.close().catch(() => undefined);
    dataFile?.close();
  }
}

async function run(snap: SnapshotContents, opts: LoadOptions, dataFile: DirectFile | null): Promise<LoadResult> {
  const ps = snap.header.pageSize;
  const postcopy = opts.postcopy !== undefined;
  // Measured on the 2-vCPU bench VM: 2 and 4 MiB reads were no faster
  // than 1 MiB (fresh larger buffers cost more page faults), 512 KiB no faster either.
  const readSize = opts.readSize ?? 1 << 20;
  const maxInFlight = opts.maxInFlight ?? 8;
  const runs = await mapBlocks(snap);
  // The digest of a chunk of zeros, from a hasher of its own (the verifier's
  // is in the middle of a chunk whenever it is asked).
  const zeros = snap.digests && opts.verify !== false ? await createChunkHasher(snap.digests.algorithm) : null;
  if (zeros) checkUnmappedChunks(snap, runs, zeros);
  const plan = buildPlan(runs, readSize);
  // Precopy to a file descriptor (the CLI's pipe, or --output) runs without
  // streams: synchronous reads into one reused buffer, encoded and written
  // synchronously into one reused output buffer (DirectLoadPump). Postcopy
  // keeps the stream pipeline: the main thread must stay free to read page
  // requests while the pipe is full, and urgent reads jump the queue.
  // Under O_DIRECT every read goes through the ordered reader (N in flight):
  // DirectLoadPump's synchronous reads would have one.
  const pumped = !postcopy && dataFile === null;
  let ownFd: number | null = null;
  let direct: FdWriter | null = null;
  if (pumped && opts.output) {
    try {
      ownFd = fs.openSync(opts.output, 'w');
    } catch (err) {
      throw new LoadError(`cannot write ${opts.output}: ${(err as Error).message}`);
    }
    direct = new FdWriter(ownFd);
  } else if (pumped && !opts.output && opts.stdout instanceof FdWriter) {
    direct = opts.stdout;
  }
  let pump: DirectLoadPump | null = null;
  let reader: OrderedBlockReader | null = null;
  let alignedReads: RunBufferPool | null = null;
  // The encoder copies every read into its output and the verifier hashes it
  // at once: when they return, the read's buffer is free again.
  const releaseRead = (read: BlockRead): void => {
    if (alignedReads && read.data) alignedReads.release(read.data);
  };
  if (direct) {
    pump = new DirectLoadPump(snap.image, plan, (read) => encoder.encode(read), { readSize });
  } else {
    const image = snap.image;
    const allocate = dataFile ? alignedAllocator(dataFile.memAlign) : null;
    if (allocate) alignedReads = new RunBufferPool(readSize, 2 * maxInFlight + 4, allocate);
    const pool = alignedReads;
    const read = pool && allocate
      ? (offset: number, length: number) => {
          // Aligned buffers, reused once the encoder has copied a read out
          // (releaseRead): fresh ones cost page faults on every read.
          const buf = length <= readSize ? pool.take() : allocate(length);
          return image.readInto(offset, length, buf, 0).then(() => buf.subarray(0, length));
        }
      : (offset: number, length: number) => image.read(offset, length);
    reader = new OrderedBlockReader({ read }, plan, {
      maxInFlight,
      highWaterMark: postcopy ? 256 << 10 : 4 << 20,
    });
  }
  const stop = (err: Error): void => {
    if (reader) reader.destroy(err);
    else pump?.abort(err);
  };

  const started = Date.now();
  let switched = false;
  const thresholdPages = postcopy ? Math.ceil((snap.header.dataPages * (opts.postcopy ?? 0)) / 100) : Infinity;

  // Precopy: leader, RAM, device state (with its EOF and VMDESCRIPTION).
  // Postcopy: the leader with OPEN_RETURN_PATH, ADVISE and a PING, RAM until
  // the threshold, the switch, the rest of RAM, EOF.
  let prefix: Buffer[] = [snap.leader];
  if (postcopy) {
    // ADVISE tells the destination to read the per-block page sizes a
    // postcopy source adds to MEM_SIZE: put it before the ram section only
    // when the saved block list carries them (docs/postcopy-protocol.md).
    const split = snap.streamBlocks.some((b) => b.pageSize !== undefined) ? snap.header.ramSectionOffset : snap.leader.length;
    prefix = [snap.leader.subarray(0, split), encodeOpenReturnPath(), encodePostcopyAdvise(ps, ps), encodePing(ADVISE_PING), snap.leader.subarray(split)];
  }
  // After a switch with nothing left to page in, QEMU 7.2 cannot take LISTEN
  // without a discard: finish such a load as precopy instead.
  let finishAsPrecopy = !postcopy;

  // Urgent range offset → when its request arrived, for request latencies.
  const requested = new Map<number, bigint>();
  const latencies: number[] = [];
  let adviseAccepted: Promise<void> = Promise.resolve();
  // RAM is checked against the save's digests alongside the stream; the
  // device state (or EOF) that lets the destination finish waits for it.
  let verifier: StreamVerifier | null = null;
  if (snap.digests && zeros) {
    // Hashed on this thread: as fast as a digest worker through a pipe, with
    // less CPU in all (no hand-offs, no buffer transfers), which the
    // destination QEMU on the same CPUs can use.
    verifier = new StreamVerifier(snap, new InlinePieceDigester(await createChunkHasher(snap.digests.algorithm)), (n) => zeros.zeroChunk(n));
    verifier.finished.catch(stop);
  }
  const encoder: LoadEncoder = new LoadEncoder({
    sink: direct ? (chunk) => direct?.writeSync(chunk) : undefined,
    gather: direct?.segmentWriter ?? undefined,
    blocks: snap.blocks,
    pageSize: ps,
    ramSectionId: snap.ramSection.sectionId,
    prefix,
    beforeFirstRange: () => adviseAccepted,
    beforeSuffix: () => {
      if (!verifier) return Promise.resolve();
      verifier.end();
      return verifier.finished;
    },
    onBackgroundEncoded: (read) => {
      verifier?.add(read.offset, read.length, read.data);
      releaseRead(read);
    },
    suffix: () => (finishAsPrecopy ? [snap.deviceState] : [Buffer.from([Token.EOF])]),
    interject: () => {
      if (!postcopy || switched || encoder.dataPagesSent < thresholdPages) return null;
      switched = true;
      opts.onEvent?.('switch', Date.now() - started);
      const discards = discardCommands(snap, encoder);
      if (discards.length === 0) {
        finishAsPrecopy = true;
        return null;
      }
      // The backlog of background reads delays requested pages: keep it short.
      reader?.setMaxInFlight(Math.min(2, maxInFlight));
      return [...discards, ...encodeListenPackage([snap.deviceSections])];
    },
    flushEachRange: () => switched,
    onUrgentSent: (read) => {
      releaseRead(read);
      const t0 = requested.get(read.offset);
      if (t0 === undefined) return;
      requested.delete(read.offset);
      latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
    },
  });

  let shutStatus: number | null = null;
  let returnPathDone: Promise<void> = Promise.resolve();
  let rpGate: InputGate | null = null;
  let onPong: (() => void) | null = null;

  if (postcopy && opts.returnPath && reader) {
    const bg = reader;
    rpGate = new InputGate(opts.returnPath);
    const blocksByName = new Map(snap.blocks.map((b, i) => [b.id, i] as const));
    const parser = new ReturnPathParser({ blocks: new Map(snap.blocks.map((b) => [b.id, b.length] as const)), pageSize: ps });
    const sink = new Writable({
      write(data: unknown, cb: (err: Error | null) => void) {
        const msg = data as ReturnPathMsg;
        if (msg.type === 'shut') shutStatus = msg.status;
        else if (msg.type === 'pong' && msg.value === ADVISE_PING) onPong?.();
        else if (msg.type === 'req-pages') {
          const index = blocksByName.get(msg.block);
          if (index !== undefined) requestPages(snap, bg, encoder, index, msg.offset, msg.length, requested);
        }
        cb(null);
      },
    });
    returnPathDone = pumpAsync(rpGate, parser, sink);
    // No RAM goes out before the destination answers the PING that follows
    // ADVISE: one without postcopy-ram exits on ADVISE without a word.
    adviseAccepted = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new LoadError(`no answer from the destination within ${PONG_TIMEOUT_MS / 1000} s after POSTCOPY_ADVISE: is stdin its return path?`)), PONG_TIMEOUT_MS);
      onPong = () => {
        clearTimeout(timer);
        resolve();
      };
      returnPathDone.then(
        () => {
          clearTimeout(timer);
          reject(new LoadError(NO_POSTCOPY_RAM));
        },
        () => clearTimeout(timer),
      );
    });
    adviseAccepted.catch(() => undefined);
    // A return path that ends or breaks before SHUT ends the load at once.
    returnPathDone.then(
      () => {
        if (shutStatus === null) bg.destroy(new LoadError(switched ? 'the destination closed its return path before the migration ended' : NO_POSTCOPY_RAM));
      },
      (err: Error) => bg.destroy(err instanceof QemuSnapError ? err : new LoadError(`return path: ${err.message}`)),
    );
  }

  const onAbort = () => stop(new LoadError(`load interrupted (${String(opts.signal?.reason ?? 'aborted')})`));
  if (opts.signal?.aborted) onAbort();
  opts.signal?.addEventListener('abort', onAbort);
  const progress = setInterval(() => opts.onProgress?.(encoder.bytesOut, encoder.dataPagesSent), 200);

  try {
    if (direct && pump) {
      await encoder.begin();
      await pump.run();
      await encoder.finish();
      (direct as unknown as NodeJS.WritableStream).end();
    } else if (reader) {
      const out: NodeJS.WritableStream = opts.output ? fs.createWriteStream(opts.output) : opts.stdout ?? process.stdout;
      await pumpAsync(reader, encoder, out).catch((err: Error) => {
        if (postcopy && !switched && isPipeGone(err)) {
          throw new LoadError(NO_POSTCOPY_RAM);
        }
        throw err;
      });
    }
    if (postcopy) {
      opts.onEvent?.('eof', Date.now() - started);
      await waitForShut(() => shutStatus, returnPathDone, opts.signal);
      opts.onEvent?.('shut', Date.now() - started);
      if (shutStatus !== 0) throw new LoadError(`the destination reported a failed migration (SHUT status ${shutStatus})`);
    }
    return {
      streamBytes: encoder.bytesOut,
      dataPagesSent: encoder.dataPagesSent,
      zeroPagesSent: encoder.zeroPagesSent,
      requests: postcopy ? { count: latencies.length, latenciesMs: latencies } : undefined,
    };
  } finally {
    clearInterval(progress);
    if (ownFd !== null) fs.closeSync(ownFd);
    opts.signal?.removeEventListener('abort', onAbort);
    rpGate?.destroy();
  }
}

function isPipeGone(err: Error): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EPIPE' || code === 'ECONNRESET' || /premature close/i.test(err.message);
}

/** A discard for every page not yet sent: the destination must fault on them. */
function discardCommands(snap: SnapshotContents, encoder: LoadEncoder): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < snap.blocks.length; i++) {
    const runs = encoder.unsentRanges(i);
    if (runs.length > 0) out.push(...encodeRamDiscard(snap.blocks[i].id, runs));
  }
  return out;
}

/** Queues the unsent pages of a request on the reader's urgent lane. */
function requestPages(
  snap: SnapshotContents,
  reader: OrderedBlockReader,
  encoder: LoadEncoder,
  index: number,
  offset: number,
  length: number,
  requested: Map<number, bigint>,
): void {
  const ps = snap.header.pageSize;
  const block = snap.blocks[index];
  const t0 = process.hrtime.bigint();
  let first = Math.floor(offset / ps);
  const end = Math.ceil((offset + length) / ps);
  while (first < end && encoder.isSent(index, first)) first++;
  let last = end;
  while (last > first && encoder.isSent(index, last - 1)) last--;
  if (first >= last) return;
  let runs: Array<{ offset: number; length: number; allocated: boolean }>;
  try {
    runs = snap.image.allocatedRanges(block.offset + first * ps, (last - first) * ps);
  } catch {
    // Its L2 table is not in memory: read the range (a hole reads as zeros).
    runs = [{ offset: block.offset + first * ps, length: (last - first) * ps, allocated: true }];
  }
  for (const run of runs) {
    if (!requested.has(run.offset)) requested.set(run.offset, t0);
    // Once the reader has ended, every page is already on its way to the
    // encoder (emitted, not yet encoded): the request is served by that.
    if (reader.destroyed || reader.exhausted) return;
    reader.urgent({ offset: run.offset, length: run.length, hole: !run.allocated, tag: index });
  }
}

function waitForShut(status: () => number | null, done: Promise<void>, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const check = setInterval(() => {
      if (status() !== null) finish();
      else if (signal?.aborted) finish(new LoadError('load interrupted while waiting for the destination'));
    }, 10);
    const finish = (err?: Error) => {
      clearInterval(check);
      if (err) reject(err);
      else resolve();
    };
    done.then(
      () => (status() !== null ? finish() : finish(new LoadError('the destination closed its return path without SHUT'))),
      (err: Error) => finish(err instanceof QemuSnapError ? err : new LoadError(`return path: ${err.message}`)),
    );
  });
}
