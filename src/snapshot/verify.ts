// Checking RAM against the digests recorded at save: chunk by chunk, the
// digest of what the image reads. `verify` reads the image itself and hashes
// in the digest worker; `load` hashes the reads it streams (StreamVerifier).
import { ChunkDigester, DigestMismatchError } from './digests';
import { createChunkHasher } from './chunk-hash';
import type { PieceDigester } from './digest-pieces';
import { openSnapshot, SnapshotContents } from './snapshot-image';
import { QemuSnapError } from '../errors';

export interface VerifyResult {
  chunks: number;
  /** Pages that are not all zero, as read from the image. */
  dataPages: number;
  summary: string;
}

const CHUNKS_IN_FLIGHT = 3;

/** Verifies every chunk of the virtual disk against the image's digest table. */
export async function verifyChunks(
  snap: SnapshotContents,
  digester: ChunkDigester,
  signal?: AbortSignal,
  onProgress?: (bytes: number, pages: number) => void,
): Promise<{ chunks: number; dataPages: number }> {
  const table = snap.digests;
  if (!table) throw new QemuSnapError(`${snap.path}: no RAM digests to verify`);
  const size = snap.image.virtualSize;
  const cs = table.chunkSize;
  const zeros = await createChunkHasher(table.algorithm);
  let next = 0;
  let dataPages = 0;
  let checked = 0;
  const worker = async (): Promise<void> => {
    while (next < table.chunks.length) {
      if (signal?.aborted) throw new QemuSnapError('verification interrupted');
      const c = next++;
      const offset = c * cs;
      const length = Math.min(cs, size - offset);
      await snap.image.loadMetadata(offset, length);
      const allocated = snap.image.allocatedRanges(offset, length).some((r) => r.allocated);
      let crc: number;
      if (allocated) {
        const d = await digester.digest(await snap.image.read(offset, length));
        crc = d.crc;
        dataPages += d.dataPages;
      } else {
        crc = zeros.zeroChunk(length);
      }
      if (crc !== table.chunks[c]) {
        throw new DigestMismatchError(`${snap.path}: RAM digest mismatch ${where(snap, offset)} (chunk ${c}): the image is damaged`);
      }
      checked += length;
      onProgress?.(checked, dataPages);
    }
  };
  await Promise.all(Array.from({ length: CHUNKS_IN_FLIGHT }, worker));
  return { chunks: table.chunks.length, dataPages };
}

/** Where disk `offset` lies, for an error message: block and offset in it. */
export function where(snap: SnapshotContents, offset: number): string {
  const b = snap.blocks.find((x) => offset >= x.offset && offset < x.offset + Math.max(x.length, 1));
  return b ? `in block ${b.id} at offset 0x${(offset - b.offset).toString(16)}` : `at disk offset 0x${offset.toString(16)} (outside every RAM block)`;
}

/** `qemu-snap verify`: structure (open checks everything load checks) and, when present, every digest. */
export async function verifySnapshot(path: string, opts: { onProgress?(bytes: number, pages: number): void } = {}): Promise<VerifyResult> {
  const snap = await openSnapshot(path);
  try {
    if (!snap.digests) {
      return { chunks: 0, dataPages: snap.header.dataPages, summary: 'structure ok; this image has no RAM digests (saved without them), so RAM was not checked' };
    }
    const digester = new ChunkDigester(snap.header.pageSize, snap.digests.algorithm);
    try {
      const r = await verifyChunks(snap, digester, undefined, opts.onProgress);
      if (r.dataPages !== snap.header.dataPages) {
        throw new DigestMismatchError(`${path}: the image holds ${r.dataPages} data pages, its STVM header says ${snap.header.dataPages}`);
      }
      return { ...r, summary: `ok: ${r.chunks} RAM chunks and the device state match their digests; ${r.dataPages} data pages` };
    } finally {
      await digester.close();
    }
  } finally {
    await snap.image.close().catch(() => undefined);
  }
}

/**
 * Verifies RAM from the very reads the loader makes, instead of reading the
 * image a second time: background reads come in plan order (ascending disk
 * offsets, holes included), so each chunk's CRC is built piece by piece;
 * bytes the plan does not cover (padding after a block) are zeros. Each
 * read's pieces go to the digester in one call, once the encoder is done
 * with the buffer (a worker digester may take its memory).
 */
export class StreamVerifier {
  private readonly cs: number;
  private chunk = -1;
  /** Chunks below this were closed or checked. */
  private nextChunk = 0;
  /** Bytes of the current chunk accounted for so far. */
  private pos = 0;
  private pending = 0;
  private ended = false;
  private error: Error | null = null;
  /** Pieces for the digester, handed over once per add() (see PieceDigester.pieces). */
  private batch: number[] = [];
  private done: (() => void) | null = null;
  private fail: ((err: Error) => void) | null = null;
  readonly finished: Promise<void>;

  /**
   * @param zeroChunk the digest of a chunk of zeros of a given length (from a
   *   hasher of its own: the digester's may be in the middle of a chunk).
   */
  constructor(
    private readonly snap: SnapshotContents,
    private readonly digester: PieceDigester,
    private readonly zeroChunk: (length: number) => number,
  ) {
    if (!snap.digests) throw new QemuSnapError(`${snap.path}: no RAM digests to verify`);
    this.cs = snap.digests.chunkSize;
    this.finished = new Promise<void>((resolve, reject) => {
      this.done = resolve;
      this.fail = reject;
    });
    this.finished.catch(() => undefined);
    digester.onChunkDigest = (c, crc) => this.check(c, crc);
  }

  /** One background read (data, or null for a hole), in plan order. */
  add(offset: number, length: number, data: Buffer | null): void {
    if (this.error) return;
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const c = Math.floor(at / this.cs);
      if (c !== this.chunk) this.moveTo(c);
      const chunkStart = c * this.cs;
      if (at - chunkStart > this.pos) this.zeros(at - chunkStart - this.pos);
      const n = Math.min(end, chunkStart + this.chunkLength(c)) - at;
      const closes = at - chunkStart + n >= this.chunkLength(c);
      if (!data && at === chunkStart && closes) {
        // A whole chunk of hole: its CRC is known without hashing zeros.
        this.check(c, this.zeroChunk(n), false);
        this.chunk = -1;
        at += n;
        continue;
      }
      if (closes) this.pending++;
      if (data) this.batch.push(c, at - offset, at - offset + n, 0, closes ? 1 : 0);
      else this.batch.push(c, 0, 0, n, closes ? 1 : 0);
      this.pos = at - chunkStart + n;
      if (closes) this.chunk = -1;
      at += n;
    }
    this.send(data);
  }

  /** The plan is exhausted: close the last chunk; `finished` settles when every CRC is checked. */
  end(): void {
    if (this.chunk >= 0) this.moveTo(-1);
    this.skipTo(this.snap.digests?.chunks.length ?? 0);
    this.send(null);
    this.ended = true;
    this.settle();
  }

  private chunkLength(c: number): number {
    return Math.min(this.cs, this.snap.image.virtualSize - c * this.cs);
  }

  /** Closes the open chunk with zeros up to its end. */
  private moveTo(next: number): void {
    if (this.chunk >= 0) {
      this.pending++;
      this.batch.push(this.chunk, 0, 0, this.chunkLength(this.chunk) - this.pos, 1);
    }
    if (next >= 0) this.skipTo(next);
    this.chunk = next;
    this.pos = 0;
    if (next >= 0) this.nextChunk = next + 1;
  }

  /** Chunks no read touches must be all zeros on the disk and in the table. */
  private skipTo(c: number): void {
    for (; this.nextChunk < c; this.nextChunk++) this.check(this.nextChunk, this.zeroChunk(this.chunkLength(this.nextChunk)), false);
  }

  private zeros(n: number): void {
    this.batch.push(this.chunk, 0, 0, n, 0);
    this.pos += n;
  }

  /** Hands the batch to the worker, with `data` (which moves there when it can). */
  private send(data: Buffer | null): void {
    if (this.batch.length === 0) return;
    const items = this.batch;
    this.batch = [];
    this.digester.pieces(data, items);
  }

  private check(c: number, crc: number, fromWorker = true): void {
    if (fromWorker) this.pending--;
    const table = this.snap.digests;
    if (!this.error && table && crc !== table.chunks[c]) {
      this.error = new DigestMismatchError(`${this.snap.path}: RAM digest mismatch ${where(this.snap, c * this.cs)} (chunk ${c}): the image is damaged`);
      this.fail?.(this.error);
    }
    this.settle();
  }

  private settle(): void {
    if (this.ended && this.pending === 0 && !this.error) this.done?.();
  }
}
