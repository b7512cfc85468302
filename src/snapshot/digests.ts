// RAM digests: our versioned extension after the device state in the VM
// state area (DESIGN.md). The virtual disk is cut into chunks; each chunk's
// digest is a 32-bit hash of its bytes as the image reads them (holes as
// zeros): CRC-32 in version 1, the low 32 bits of XXH64 in version 2 (what
// save writes; see chunk-hash.ts). Save computes them while the stream is
// still coming in; load and verify recompute and compare.
//
// Extension layout (big-endian), at VM state offset 28 + stateLength:
//   be32 magic "QSDG", be16 version (1 or 2), be16 header length (32),
//   be32 chunk size, be32 chunk count, be32 CRC-32 of leader + device state,
//   be32 CRC-32 of the digest table, be64 reserved (0),
//   then one be32 chunk digest per chunk.
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { Worker } from 'node:worker_threads';
import { QemuSnapError } from '../errors';
import { WORKER_HEAP } from '../util/fd-reader';
import type { DigestAlgorithm } from './chunk-hash';

export const DIGEST_MAGIC = 0x51534447; // "QSDG"
/** The algorithm save uses (version 2); version 1 images (CRC-32) are still read. */
export const SAVE_DIGEST_ALGORITHM: DigestAlgorithm = 'xxh64';
const ALGORITHM_VERSION: Record<DigestAlgorithm, number> = { crc32: 1, xxh64: 2 };
const VERSION_ALGORITHM: Record<number, DigestAlgorithm> = { 1: 'crc32', 2: 'xxh64' };
export const DIGEST_HEADER_SIZE = 32;
export const DIGEST_CHUNK_SIZE = 1 << 20;
export class DigestMismatchError extends QemuSnapError {}

export interface DigestTable {
  algorithm: DigestAlgorithm;
  chunkSize: number;
  stateCrc: number;
  chunks: Uint32Array;
}

export function encodeDigestTable(t: DigestTable): Buffer {
  const b = Buffer.alloc(DIGEST_HEADER_SIZE + 4 * t.chunks.length);
  for (let i = 0; i < t.chunks.length; i++) b.writeUInt32BE(t.chunks[i], DIGEST_HEADER_SIZE + 4 * i);
  b.writeUInt32BE(DIGEST_MAGIC, 0);
  b.writeUInt16BE(ALGORITHM_VERSION[t.algorithm], 4);
  b.writeUInt16BE(DIGEST_HEADER_SIZE, 6);
  b.writeUInt32BE(t.chunkSize, 8);
  b.writeUInt32BE(t.chunks.length, 12);
  b.writeUInt32BE(t.stateCrc, 16);
  b.writeUInt32BE(zlib.crc32(b.subarray(DIGEST_HEADER_SIZE)), 20);
  return b;
}

/**
 * Reads the extension header; `null` when there is none (an image written
 * before digests existed, or by another tool), which still loads.
 * Returns the table length to read next.
 */
export interface DigestHeader {
  algorithm: DigestAlgorithm;
  chunkSize: number;
  chunkCount: number;
  stateCrc: number;
  tableCrc: number;
}

export function decodeDigestHeader(where: string, b: Buffer): DigestHeader | null {
  if (b.length < DIGEST_HEADER_SIZE || b.readUInt32BE(0) !== DIGEST_MAGIC) return null;
  const version = b.readUInt16BE(4);
  const algorithm = VERSION_ALGORITHM[version];
  if (algorithm === undefined) return null; // a newer extension we do not know: ignore it, as promised
  const headerLength = b.readUInt16BE(6);
  const chunkSize = b.readUInt32BE(8);
  const chunkCount = b.readUInt32BE(12);
  if (headerLength !== DIGEST_HEADER_SIZE || chunkSize < 4096 || (chunkSize & (chunkSize - 1)) !== 0) {
    throw new DigestMismatchError(`${where}: damaged RAM digest extension (header length ${headerLength}, chunk size ${chunkSize}, ${chunkCount} chunks)`);
  }
  return { algorithm, chunkSize, chunkCount, stateCrc: b.readUInt32BE(16), tableCrc: b.readUInt32BE(20) };
}

export function decodeDigestTable(where: string, hdr: DigestHeader, table: Buffer): DigestTable {
  if (table.length !== hdr.chunkCount * 4 || zlib.crc32(table) !== hdr.tableCrc) {
    throw new DigestMismatchError(`${where}: the RAM digest table is damaged (its own checksum does not match)`);
  }
  const chunks = new Uint32Array(hdr.chunkCount);
  for (let i = 0; i < hdr.chunkCount; i++) chunks[i] = table.readUInt32BE(4 * i);
  return { algorithm: hdr.algorithm, chunkSize: hdr.chunkSize, stateCrc: hdr.stateCrc, chunks };
}

export interface ChunkDigest {
  crc: number;
  /** Pages of the chunk that are not all zero. */
  dataPages: number;
}

/** Digests (and data-page counts) of whole chunks, computed by a worker thread (`verify`). */
export class ChunkDigester {
  private readonly worker: Worker;
  private nextId = 0;
  private readonly waiting = new Map<number, { resolve: (d: ChunkDigest) => void; reject: (e: Error) => void }>();
  private failed: Error | null = null;

  constructor(
    private readonly pageSize: number,
    private readonly algorithm: DigestAlgorithm,
  ) {
    // By default Node pipes a worker's stdout and stderr into the parent's,
    // which creates process.stdout and so makes fd 1 non-blocking (load
    // writes the stream to fd 1 synchronously; EAGAIN there costs sleeps).
    // The worker prints nothing to stdout; its stderr is forwarded by hand.
    this.worker = new Worker(path.join(__dirname, 'digest-worker.js'), { resourceLimits: WORKER_HEAP, stdout: true, stderr: true });
    this.worker.stderr.on('data', (d: Buffer) => process.stderr.write(d));
    this.worker.unref();
    this.worker.on('message', (m: { id: number; crc?: number; dataPages?: number; error?: string }) => {
      const w = this.waiting.get(m.id);
      this.waiting.delete(m.id);
      if (m.error !== undefined) w?.reject(new QemuSnapError(`digest worker: ${m.error}`));
      else w?.resolve({ crc: (m.crc ?? 0) >>> 0, dataPages: m.dataPages ?? 0 });
    });
    this.worker.on('error', (err: Error) => this.fail(err));
    this.worker.on('exit', (code) => {
      if (this.waiting.size > 0) this.fail(new Error(`digest worker exited (code ${code})`));
    });
  }

  /** Digests `data`, which the caller gives up: its memory moves to the worker when it can. */
  digest(data: Buffer): Promise<ChunkDigest> {
    if (this.failed) return Promise.reject(this.failed);
    const id = this.nextId++;
    const own = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength && !(data.buffer instanceof SharedArrayBuffer);
    const view = own ? new Uint8Array(data.buffer, 0, data.byteLength) : new Uint8Array(data);
    return new Promise<ChunkDigest>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ id, data: view, pageSize: this.pageSize, algorithm: this.algorithm }, [view.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await this.worker.terminate();
  }

  private fail(err: Error): void {
    this.failed = err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }
}

/** Chunk i covers [i × chunkSize, min((i+1) × chunkSize, virtualSize)). */
export function chunkCount(virtualSize: number, chunkSize = DIGEST_CHUNK_SIZE): number {
  return Math.ceil(virtualSize / chunkSize);
}
