// CRC-32 of chunks fed in consecutive pieces: what the digest worker and an
// inline (same-thread) digester both run. See ChunkDigester.pieces() for the
// item layout.
import * as zlib from 'node:zlib';

const zeroRun = Buffer.alloc(1 << 20);

export function crcZeros(n: number, crc: number): number {
  for (; n > 0; n -= zeroRun.length) crc = zlib.crc32(zeroRun.subarray(0, Math.min(n, zeroRun.length)), crc);
  return crc;
}

/**
 * Applies `items` (groups of chunk, start, end, zeros, final) over `data`
 * (its bytes [start, end) for each item that has some), keeping open chunks'
 * CRCs in `partial`; pushes (chunk, crc) of each chunk closed onto `closed`.
 */
export function applyPieces(partial: Map<number, number>, data: Uint8Array | null, items: number[], closed: number[]): void {
  for (let i = 0; i < items.length; i += 5) {
    const chunk = items[i];
    let crc = partial.get(chunk) ?? 0;
    const start = items[i + 1];
    const end = items[i + 2];
    if (data && end > start) crc = zlib.crc32(data.subarray(start, end), crc);
    if (items[i + 3] > 0) crc = crcZeros(items[i + 3], crc);
    if (items[i + 4] !== 0) {
      partial.delete(chunk);
      closed.push(chunk, crc >>> 0);
    } else {
      partial.set(chunk, crc);
    }
  }
}

/** Where StreamVerifier sends pieces: the digest worker, or this thread. */
export interface PieceDigester {
  /** See ChunkDigester.pieces(). */
  pieces(data: Buffer | null, items: number[], give: boolean): void;
  /** Receives the CRC of each chunk closed. */
  onPieceCrc: ((chunk: number, crc: number) => void) | null;
}

/**
 * Pieces hashed at once on the calling thread. Costs the caller ~0.25 s of
 * CPU per GiB, but nothing moves between threads: with 2 CPUs shared with
 * the pipe's reader, handing each read to a worker (a wake-up per message,
 * and the worker's GC freeing every transferred buffer) cost more in total.
 */
export class InlinePieceDigester implements PieceDigester {
  private readonly partial = new Map<number, number>();
  private readonly closed: number[] = [];
  onPieceCrc: ((chunk: number, crc: number) => void) | null = null;

  pieces(data: Buffer | null, items: number[]): void {
    const closed = this.closed;
    closed.length = 0;
    applyPieces(this.partial, data, items, closed);
    for (let i = 0; i < closed.length; i += 2) this.onPieceCrc?.(closed[i], closed[i + 1]);
  }
}
