// RAM digests: our versioned extension after the device state in the VM
// state area (DESIGN.md). The virtual disk is cut into chunks; each chunk's
// digest is the CRC-32 of its bytes as the image reads them (holes as
// zeros). Save computes them while the stream is still coming in; load and
// verify recompute and compare.
//
// Extension layout (big-endian), at VM state offset 28 + stateLength:
//   be32 magic "QSDG", be16 version (1), be16 header length (32),
//   be32 chunk size, be32 chunk count, be32 CRC-32 of leader + device state,
//   be32 CRC-32 of the digest table, be64 reserved (0),
//   then one be32 CRC-32 per chunk.
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { Worker } from 'node:worker_threads';
import { QemuSnapError } from '../errors';
import { WORKER_HEAP } from '../util/fd-reader';
import type { PieceDigester } from './crc-pieces';

export const DIGEST_MAGIC = 0x51534447; // "QSDG"
export const DIGEST_VERSION = 1;
export const DIGEST_HEADER_SIZE = 32;
export const DIGEST_CHUNK_SIZE = 1 << 20;
export class DigestMismatchError extends QemuSnapError {}

export interface DigestTable {
  chunkSize: number;
  stateCrc: number;
  chunks: Uint32Array;
}

export function encodeDigestTable(t: DigestTable): Buffer {
  const b = Buffer.alloc(DIGEST_HEADER_SIZE + 4 * t.chunks.length);
  for (let i = 0; i < t.chunks.length; i++) b.writeUInt32BE(t.chunks[i], DIGEST_HEADER_SIZE + 4 * i);
  b.writeUInt32BE(DIGEST_MAGIC, 0);
  b.writeUInt16BE(DIGEST_VERSION, 4);
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
export function decodeDigestHeader(where: string, b: Buffer): { chunkSize: number; chunkCount: number; stateCrc: number; tableCrc: number } | null {
  if (b.length < DIGEST_HEADER_SIZE || b.readUInt32BE(0) !== DIGEST_MAGIC) return null;
  const version = b.readUInt16BE(4);
  if (version !== DIGEST_VERSION) return null; // a newer extension we do not know: ignore it, as promised
  const headerLength = b.readUInt16BE(6);
  const chunkSize = b.readUInt32BE(8);
  const chunkCount = b.readUInt32BE(12);
  if (headerLength !== DIGEST_HEADER_SIZE || chunkSize < 4096 || (chunkSize & (chunkSize - 1)) !== 0) {
    throw new DigestMismatchError(`${where}: damaged RAM digest extension (header length ${headerLength}, chunk size ${chunkSize}, ${chunkCount} chunks)`);
  }
  return { chunkSize, chunkCount, stateCrc: b.readUInt32BE(16), tableCrc: b.readUInt32BE(20) };
}

export function decodeDigestTable(where: string, hdr: { chunkSize: number; chunkCount: number; stateCrc: number; tableCrc: number }, table: Buffer): DigestTable {
  if (table.length !== hdr.chunkCount * 4 || zlib.crc32(table) !== hdr.tableCrc) {
    throw new DigestMismatchError(`${where}: the RAM digest table is damaged (its own checksum does not match)`);
  }
  const chunks = new Uint32Array(hdr.chunkCount);
  for (let i = 0; i < hdr.chunkCount; i++) chunks[i] = table.readUInt32BE(4 * i);
  return { chunkSize: hdr.chunkSize, stateCrc: hdr.stateCrc, chunks };
}

/** CRC-32 of `length` zero bytes, cached: what an unallocated chunk must have. */
const zeroCrcs = new Map<number, number>();
export function zeroChunkCrc(length: number): number {
  let c = zeroCrcs.get(length);
  if (c === undefined) {
    c = zlib.crc32(Buffer.alloc(length));
    zeroCrcs.set(length, c);
  }
  return c;
}

export interface ChunkDigest {
  crc: number;
  /** Pages of the chunk that are not all zero. */
  dataPages: number;
}

/** CRC-32 (and data-page count) of buffers, computed by a worker thread. */
export class ChunkDigester implements PieceDigester {
  private readonly worker: Worker;
  private nextId = 0;
  private readonly waiting = new Map<number, { resolve: (d: ChunkDigest) => void; reject: (e: Error) => void }>();
  private failed: Error | null = null;

  constructor(private readonly pageSize: number) {
    // By default Node pipes a worker's stdout and stderr into the parent's,
    // which creates process.stdout and so makes fd 1 non-blocking (load
    // writes the stream to fd 1 synchronously; EAGAIN there costs sleeps).
    // The worker prints nothing to stdout; its stderr is forwarded by hand.
    this.worker = new Worker(path.join(__dirname, 'digest-worker.js'), { resourceLimits: WORKER_HEAP, stdout: true, stderr: true });
    this.worker.stderr.on('data', (d: Buffer) => process.stderr.write(d));
    this.worker.unref();
    this.worker.on('message', (m: { id?: number; crcs?: number[]; crc: number; dataPages?: number }) => {
      if (m.crcs !== undefined) {
        for (let i = 0; i < m.crcs.length; i += 2) this.onPieceCrc?.(m.crcs[i], m.crcs[i + 1] >>> 0);
        return;
      }
      const w = this.waiting.get(m.id as number);
      this.waiting.delete(m.id as number);
      w?.resolve({ crc: m.crc >>> 0, dataPages: m.dataPages ?? 0 });
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
      this.worker.postMessage({ kind: 'whole', id, data: view, pageSize: this.pageSize }, [view.buffer as ArrayBuffer]);
    });
  }

  /** Receives the CRC of each chunk fed with piece(); set by the one user of pieces. */
  onPieceCrc: ((chunk: number, crc: number) => void) | null = null;

  /**
   * Adds to chunks' CRCs in one message (each message wakes the worker, and
   * on our VMs a cross-thread wake-up costs 20-40 µs): `items` holds groups
   * of five numbers, in order: chunk, start, end, zeros, final (0/1). Each
   * adds bytes [start, end) of `data` (none when start = end), then `zeros`
   * zero bytes; final closes the chunk, whose CRC comes to onPieceCrc.
   * `data`'s memory moves to the worker when `give` is set and it owns it
   * (the caller must not touch it afterwards); otherwise the bytes used are copied.
   */
  pieces(data: Buffer | null, items: number[], give: boolean): void {
    if (this.failed || items.length === 0) return;
    let view: Uint8Array | null = null;
    let transfer: ArrayBuffer[] = [];
    let shift = 0;
    if (data) {
      const own = give && data.byteOffset === 0 && data.byteLength === data.buffer.byteLength && !(data.buffer instanceof SharedArrayBuffer);
      if (own) {
        view = new Uint8Array(data.buffer, 0, data.byteLength);
        transfer = [data.buffer as ArrayBuffer];
      } else {
        // Copy only the span the items use.
        let lo = Infinity;
        let hi = 0;
        for (let i = 0; i < items.length; i += 5) {
          if (items[i + 2] > items[i + 1]) {
            lo = Math.min(lo, items[i + 1]);
            hi = Math.max(hi, items[i + 2]);
          }
        }
        if (hi > lo) {
          view = new Uint8Array(data.subarray(lo, hi));
          shift = lo;
        }
      }
    }
    if (shift !== 0) {
      items = items.slice();
      for (let i = 0; i < items.length; i += 5) {
        if (items[i + 2] > items[i + 1]) {
          items[i + 1] -= shift;
          items[i + 2] -= shift;
        }
      }
    }
    this.worker.postMessage({ kind: 'pieces', data: view, items }, transfer);
  }

  /** One piece, in a message of its own (see pieces()). */
  piece(chunk: number, data: Buffer | null, start: number, end: number, zeros: number, final: boolean, give: boolean): void {
    this.pieces(data, [chunk, data ? start : 0, data ? end : 0, zeros, final ? 1 : 0], give);
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
