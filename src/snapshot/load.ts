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
import { LoadEncoder, MultifdPageSink } from './load-encoder';
import { openSnapshot, SnapshotContents } from './snapshot-image';
import { encodeRecord } from '../migration/encoder';
import type { RamBlockLayout } from './layout';
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
  /** Every ~200 ms: stream bytes, data pages sent, and where the load stands. */
  onProgress?(bytes: number, pages: number, state: LoadProgress): void;
  /** Check RAM against the image's digests (default true when it has them). */
  verify?: boolean;
  /** Refuse an image whose RAM blocks add up to more than this many bytes (the RFC's -s/--image-size). */
  maxRamSize?: number;
  /**
   * Host cache mode (QEMU's names; default writeback). none and directsync
   * read RAM with O_DIRECT through the ordered reader, maxInFlight reads
   * outstanding, into aligned buffers: the image's data never enters the
   * page cache. The other modes read through the page cache.
   */
  cache?: CacheMode;
  /**
   * I/O engine for the O_DIRECT RAM reads (default threads): native is
   * Linux AIO, io_uring io_uring, each with at most maxInFlight requests in
   * the kernel; both need cache none or directsync.
   */
  aio?: AioMode;
  /** Postcopy milestones, for benchmarks. */
  onEvent?(name: 'switch' | 'eof' | 'shut', atMs: number): void;
  /**
   * The destination's host page sizes, for blocks whose page size the
   * stream does not carry (a source without postcopy-ram never sends it):
   * `{ size }` for every block whose length is a multiple of it, `{ block,
   * size }` for one block. Postcopy into hugepage-backed RAM needs them.
   */
  hostPageSizes?: Array<{ block?: string; size: number }>;
  /**
   * multifd restore (restore --qmp --channels N): data pages go to these
   * channels, the main stream (`stdout`) carries the rest. Precopy only.
   */
  multifd?: MultifdPageSink;
}

/** Where a load stands: every page goes out once, as data or as a ZERO record. */
export interface LoadProgress {
  pageSize: number;
  /** Pages of all RAM blocks. */
  totalPages: number;
  /** Data pages in the image. */
  dataPages: number;
  dataPagesSent: number;
  zeroPagesSent: number;
  /** Postcopy: the destination runs and pages in the rest; page requests served so far. */
  postcopy?: { switched: boolean; requests: number };
}

export interface LoadResult extends LoadProgress {
  streamBytes: number;
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

/**
 * A destination closes the stream on ADVISE for two reasons QEMU does not
 * tell apart on the wire (loadvm_postcopy_handle_advise): postcopy-ram off,
 * or a host page size summary other than its own.
 */
function adviseRejected(snap: SnapshotContents, hostPages: number[], fromUser: boolean): string {
  const ps = snap.header.pageSize;
  const summary = hostPages.reduce((a, b) => a | b, 0);
  const huge = snap.blocks.map((b, i) => (hostPages[i] > ps ? `${b.id} ${hostPages[i] >>> 10} KiB` : null)).filter((x) => x !== null);
  const sizes = huge.length > 0
    ? `its RAM page sizes differ from those sent (summary 0x${summary.toString(16)}: ${huge.join(', ')}${fromUser ? '' : ', from the stream'})`
    : `its RAM page sizes differ from the ${ps >>> 10} KiB pages this image was saved with (summary 0x${summary.toString(16)}); for hugepage-backed RAM give --host-page-size, e.g. 2M`;
  return `the destination rejected POSTCOPY_ADVISE (it closed the stream): page-size mismatch or no postcopy-ram: either ${sizes}, or its postcopy-ram capability is off (-incoming defer, migrate-set-capabilities postcopy-ram on, then migrate-incoming)`;
}

/** Each block's host page size on the destination: from the stream, the options, or the target page size. */
function hostPageSizes(snap: SnapshotContents, opts: LoadOptions): number[] {
  const ps = snap.header.pageSize;
  const given = opts.hostPageSizes ?? [];
  for (const g of given) {
    if (!Number.isSafeInteger(g.size) || g.size < ps || (g.size & (g.size - 1)) !== 0) {
      throw new LoadError(`host page size ${g.size} must be a power of two of at least the image's ${ps}-byte pages`);
    }
    if (g.block !== undefined && !snap.blocks.some((b) => b.id === g.block)) {
      throw new LoadError(`--host-page-size: the image has no RAM block "${g.block}" (it has ${snap.blocks.map((b) => b.id).join(', ')})`);
    }
  }
  return snap.blocks.map((b, i) => {
    const fromStream = snap.streamBlocks[i]?.pageSize;
    if (fromStream !== undefined) return fromStream;
    const named = given.find((g) => g.block === b.id);
    if (named) return named.size;
    let size = ps;
    for (const g of given) if (g.block === undefined && b.length % g.size === 0 && g.size > size) size = g.size;
    return size;
  });
}

/**
 * The leader with its MEM_SIZE block list re-encoded without the per-block
 * page sizes a postcopy-ram source adds: a destination reads them only once
 * POSTCOPY_ADVISE came (ram_load_precopy), which a precopy load never sends.
 */
function leaderWithoutPageSizes(snap: SnapshotContents): Buffer {
  const leader = snap.leader;
  const start = snap.header.ramSectionOffset;
  const at = start + 1 + 4 + 1 + leader[start + 5] + 4 + 4;
  let length = 8;
  for (const b of snap.streamBlocks) length += 1 + Buffer.byteLength(b.id, 'latin1') + 8 + (b.pageSize !== undefined ? 8 : 0) + (b.mrAddr !== undefined ? 8 : 0);
  const blocks = snap.streamBlocks.map((b) => ({ ...b, pageSize: undefined }));
  const total = snap.streamBlocks.reduce((a, b) => a + b.length, 0);
  const memSize = Buffer.concat(encodeRecord({ type: 'ram-mem-size', offset: 0, totalBytes: total, blocks }));
  return Buffer.concat([leader.subarray(0, at), memSize, leader.subarray(at + length)]);
}

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

/**
 * The background plan: every page of every block, data ranges read in
 * pieces, holes not read. A block with host pages larger than a target page
 * (postcopy into hugepages) is read in whole host pages, holes included: in
 * postcopy the destination places a host page only once all its target
 * pages came, one after the other (ram_load_postcopy).
 */
function* buildPlan(runs: Array<{ index: number; offset: number; length: number; allocated: boolean }>, readSize: number, huge?: { blocks: RamBlockLayout[]; hostPages: number[]; pageSize: number }): Generator<ReadPlanEntry> {
  const done = new Set<number>();
  for (const run of runs) {
    const hp = huge ? huge.hostPages[run.index] : 0;
    if (huge && hp > huge.pageSize) {
      if (done.has(run.index)) continue;
      done.add(run.index);
      const b = huge.blocks[run.index];
      const end = b.offset + Math.ceil(b.length / huge.pageSize) * huge.pageSize;
      const piece = Math.max(hp, Math.floor(readSize / hp) * hp);
      for (let o = b.offset; o < end; o += piece) yield { offset: o, length: Math.min(piece, end - o), hole: false, tag: run.index };
      continue;
    }
    const piece = run.allocated ? readSize : HOLE_PIECE;
    for (let o = run.offset; o < run.offset + run.length; o += piece) {
      yield { offset: o, length: Math.min(piece, run.offset + run.length - o), hole: !run.allocated, tag: run.index };
    }
  }
}

/**
 * What loadSnapshot would refuse first about its cache and aio modes (an aio
 * engine without O_DIRECT, a file system without direct I/O), checked
 * without reading anything: restore --qmp asks before it touches QEMU.
 */
export function checkLoadCache(imagePath: string, cache?: CacheMode, aio?: AioMode): void {
  const policy = cachePolicy(cache);
  checkAioMode(aio ?? 'threads', policy, 'load');
  if (policy.direct) openDirect(imagePath, fs.constants.O_RDONLY, `load --cache=${policy.mode}`, imagePath, { aio: aio ?? 'threads', maxInFlight: 1 }).close();
}

export async function loadSnapshot(imagePath: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const policy = cachePolicy(opts.cache);
  checkAioMode(opts.aio ?? 'threads', policy, 'load');
  // Opened first: a file system without direct I/O is refused before anything else.
  const dataFile = policy.direct
    ? openDirect(imagePath, fs.constants.O_RDONLY, `load --cache=${policy.mode}`, imagePath, { aio: opts.aio ?? 'threads', maxInFlight: opts.maxInFlight ?? 8 })
    : null;
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
    const ram = snap.blocks.reduce((sum, b) => sum + b.length, 0);
    if (opts.maxRamSize !== undefined && ram > opts.maxRamSize) {
      throw new LoadError(`${imagePath}: its guest RAM (${ram} bytes) is larger than the image size limit of ${opts.maxRamSize} bytes (-s/--image-size)`);
    }
    const postcopy = opts.postcopy !== undefined;
    if (postcopy && !opts.returnPath) throw new LoadError('postcopy needs the destination return path on stdin');
    if (postcopy && opts.multifd) throw new LoadError('postcopy cannot be combined with multifd channels');
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
  const hostPages = hostPageSizes(snap, opts);
  const hugeBlocks = postcopy && hostPages.some((h) => h > ps);
  const plan = buildPlan(runs, readSize, hugeBlocks ? { blocks: snap.blocks, hostPages, pageSize: ps } : undefined);
  // Precopy to a file descriptor (the CLI's pipe, or --output) runs without
  // streams: synchronous reads into one reused buffer, encoded and written
  // synchronously into one reused output buffer (DirectLoadPump). Postcopy
  // keeps the stream pipeline: the main thread must stay free to read page
  // requests while the pipe is full, and urgent reads jump the queue.
  // Under O_DIRECT every read goes through the ordered reader (N in flight):
  // DirectLoadPump's synchronous reads would have one.
  // multifd channels are sockets written from the event loop: stream pipeline too.
  // Either way a precopy to a descriptor writes synchronously, pages by
  // reference from the reads (no output chunks): a read is free again as
  // soon as it was encoded.
  const pumped = !postcopy && dataFile === null && !opts.multifd;
  let ownFd: number | null = null;
  let direct: FdWriter | null = null;
  if (!postcopy && opts.output) {
    ownFd = await openOutput(opts.output, opts.signal);
    direct = new FdWriter(ownFd);
  } else if (!postcopy && !opts.output && opts.stdout instanceof FdWriter) {
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
  if (direct && pumped) {
    const writer = direct;
    pump = new DirectLoadPump(snap.image, plan, (read) => encoder.encode(read), { readSize, drain: () => writer.flushPending() });
  } else {
    const image = snap.image;
    // multifd copies every page into its packets: its reads can reuse buffers too.
    const allocate = dataFile ? alignedAllocator(dataFile.memAlign) : opts.multifd ? (size: number) => Buffer.allocUnsafeSlow(size) : null;
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
      // multifd: no more slots than reads in flight. With the default four
      // times as many, reads done early wait in the ring for the one before
      // them (measured, 8 GiB VM holding 4 GiB, --channels 2: peak RSS
      // 151-158 MiB, up to 86 MiB of buffers; with this 89-93 MiB, no slower).
      ringSize: opts.multifd ? maxInFlight : undefined,
    });
  }
  // The stream the pipeline ends in, when it is not ours to keep (see stop()).
  let out: NodeJS.WritableStream | null = null;
  const stop = (err: Error): void => {
    if (reader) reader.destroy(err);
    else pump?.abort(err);
    direct?.cancel(err);
    // Its last write may wait for a reader that never comes (a destination
    // that stopped reading its main channel): destroying the source does not
    // end that wait, and the pipeline would never settle.
    if (out !== null && out !== process.stdout) (out as NodeJS.WritableStream & { destroy(err?: Error): void }).destroy(err);
  };

  const started = Date.now();
  let switched = false;
  const thresholdPages = postcopy ? Math.ceil((snap.header.dataPages * (opts.postcopy ?? 0)) / 100) : Infinity;

  // Precopy: leader, RAM, device state (with its EOF and VMDESCRIPTION).
  // Postcopy: the leader with OPEN_RETURN_PATH, ADVISE and a PING, RAM until
  // the threshold, the switch, the rest of RAM, EOF.
  const streamPageSizes = snap.streamBlocks.some((b) => b.pageSize !== undefined);
  let prefix: Buffer[] = [streamPageSizes ? leaderWithoutPageSizes(snap) : snap.leader];
  if (postcopy) {
    // ADVISE tells the destination to read the per-block page sizes a
    // postcopy source adds to MEM_SIZE: put it before the ram section only
    // when the saved block list carries them (docs/postcopy-protocol.md).
    // Its summary is the OR of the destination's host page sizes
    // (ram_pagesize_summary), which it must match.
    const split = streamPageSizes ? snap.header.ramSectionOffset : snap.leader.length;
    const summary = hostPages.reduce((a, b) => a | b, 0);
    prefix = [snap.leader.subarray(0, split), encodeOpenReturnPath(), encodePostcopyAdvise(summary, ps), encodePing(ADVISE_PING), snap.leader.subarray(split)];
  }
  const adviseRejectedMessage = hostPages.some((h) => h !== ps) || opts.hostPageSizes !== undefined ? adviseRejected(snap, hostPages, !streamPageSizes) : NO_POSTCOPY_RAM_OR_PAGES(snap, hostPages);
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
    multifd: opts.multifd,
    // What a full pipe did not take is kept aside: written before the next read.
    drain: direct ? () => direct?.flushPending() ?? null : undefined,
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
      const discards = discardCommands(snap, encoder, hostPages);
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
          if (index !== undefined) requestPages(snap, bg, encoder, index, msg.offset, msg.length, requested, hostPages[index]);
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
          reject(new LoadError(adviseRejectedMessage));
        },
        () => clearTimeout(timer),
      );
    });
    adviseAccepted.catch(() => undefined);
    // A return path that ends or breaks before SHUT ends the load at once.
    returnPathDone.then(
      () => {
        if (shutStatus === null) bg.destroy(new LoadError(switched ? 'the destination closed its return path before the migration ended' : adviseRejectedMessage));
      },
      (err: Error) => bg.destroy(err instanceof QemuSnapError ? err : new LoadError(`return path: ${err.message}`)),
    );
  }

  const onAbort = () => stop(new LoadError(`load interrupted (${String(opts.signal?.reason ?? 'aborted')})`));
  if (opts.signal?.aborted) onAbort();
  opts.signal?.addEventListener('abort', onAbort);
  const totalPages = snap.blocks.reduce((n, b) => n + Math.ceil(b.length / ps), 0);
  const standing = (): LoadProgress => ({
    pageSize: ps,
    totalPages,
    dataPages: snap.header.dataPages,
    dataPagesSent: encoder.dataPagesSent,
    zeroPagesSent: encoder.zeroPagesSent,
    postcopy: postcopy ? { switched, requests: latencies.length } : undefined,
  });
  const progress = setInterval(() => opts.onProgress?.(encoder.bytesOut, encoder.dataPagesSent, standing()), 200);

  try {
    if (direct && pump) {
      await encoder.begin();
      await direct.flushPending();
      await pump.run();
      await encoder.finish();
      await direct.flushPending();
      (direct as unknown as NodeJS.WritableStream).end();
    } else if (reader && direct) {
      // The encoder writes as it goes: the pipeline's end only takes the end.
      await pumpAsync(reader, encoder, new Writable({ write: (_data: unknown, cb: (err: Error | null) => void) => cb(null) }));
      await direct.flushPending();
      (direct as unknown as NodeJS.WritableStream).end();
    } else if (reader) {
      out = opts.output ? fs.createWriteStream(opts.output) : opts.stdout ?? process.stdout;
      await pumpAsync(reader, encoder, out).catch((err: Error) => {
        if (postcopy && !switched && isPipeGone(err)) {
          throw new LoadError(adviseRejectedMessage);
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
      ...standing(),
      streamBytes: encoder.bytesOut,
      requests: postcopy ? { count: latencies.length, latenciesMs: latencies } : undefined,
    };
  } finally {
    clearInterval(progress);
    if (ownFd !== null) fs.closeSync(ownFd);
    opts.signal?.removeEventListener('abort', onAbort);
    rpGate?.destroy();
  }
}

function NO_POSTCOPY_RAM_OR_PAGES(snap: SnapshotContents, hostPages: number[]): string {
  // Nothing says the destination's pages are larger: the likelier cause
  // first, the other named too.
  return `${NO_POSTCOPY_RAM}; or, if its RAM is hugepage-backed, a page-size mismatch: give --host-page-size (summary sent 0x${hostPages.reduce((a, b) => a | b, 0).toString(16)})`;
}

function isPipeGone(err: Error): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EPIPE' || code === 'ECONNRESET' || /premature close/i.test(err.message);
}

/**
 * A discard for every page not yet sent: the destination must fault on
 * them. Host pages go out whole, so the ranges are whole host pages, as the
 * destination's ram_discard_range requires (checked by encodeRamDiscard).
 */
function discardCommands(snap: SnapshotContents, encoder: LoadEncoder, hostPages: number[]): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < snap.blocks.length; i++) {
    const runs = encoder.unsentRanges(i);
    if (runs.length > 0) out.push(...encodeRamDiscard(snap.blocks[i].id, runs, { pageSize: hostPages[i] }));
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
  hostPage: number,
): void {
  const ps = snap.header.pageSize;
  const block = snap.blocks[index];
  const t0 = process.hrtime.bigint();
  if (hostPage > ps) {
    // Whole host pages, one read each, holes read as zeros: the destination
    // places a huge page only once all its target pages came in a row.
    const end = Math.min(Math.ceil((offset + length) / hostPage) * hostPage, Math.ceil(block.length / ps) * ps);
    for (let hp = Math.floor(offset / hostPage) * hostPage; hp < end; hp += hostPage) {
      if (encoder.isSent(index, hp / ps)) continue;
      const at = block.offset + hp;
      if (!requested.has(at)) requested.set(at, t0);
      if (reader.destroyed || reader.exhausted) return;
      reader.urgent({ offset: at, length: Math.min(hostPage, end - hp), hole: false, tag: index });
    }
    return;
  }
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

/**
 * open(2) of --output for writing. A FIFO with no reader yet would block in
 * open until one comes, in a thread no signal can free (process exit waits
 * for it): a FIFO is opened O_NONBLOCK, which fails with ENXIO until a reader
 * is there, so it is retried until then or until the load is interrupted.
 * The descriptor stays non-blocking; FdWriter waits out EAGAIN.
 */
async function openOutput(file: string, signal?: AbortSignal): Promise<number> {
  const interrupted = (): LoadError => new LoadError(`load interrupted (${String(signal?.reason ?? 'aborted')}) while opening ${file} (no reader on it yet?)`);
  const cannot = (err: unknown): LoadError => new LoadError(`cannot write ${file}: ${(err as Error).message}`);
  let fifo = false;
  try {
    fifo = (await fs.promises.stat(file)).isFIFO();
  } catch {
    // not there yet: created below
  }
  if (!fifo) {
    try {
      return await new Promise<number>((resolve, reject) => fs.open(file, 'w', (err, fd) => (err ? reject(err) : resolve(fd))));
    } catch (err) {
      throw cannot(err);
    }
  }
  for (;;) {
    if (signal?.aborted) throw interrupted();
    try {
      return fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENXIO') throw cannot(err);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
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
