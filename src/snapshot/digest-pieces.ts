// Chunk digests fed in consecutive pieces, as load reads the image: the
// pieces of one chunk come in order and the chunk is closed before the next
// one starts, so one hasher state is enough.
import type { ChunkHasher } from './chunk-hash';
import { QemuSnapError } from '../errors';

/** Where StreamVerifier sends pieces. */
export interface PieceDigester {
  /**
   * `items` holds groups of five numbers: chunk, start, end, zeros, final
   * (0/1). Each adds bytes [start, end) of `data` (none when start = end),
   * then `zeros` zero bytes; final closes the chunk, whose digest goes to
   * onChunkDigest.
   */
  pieces(data: Buffer | null, items: number[]): void;
  /** Receives the digest of each chunk closed. */
  onChunkDigest: ((chunk: number, crc: number) => void) | null;
}

/**
 * Pieces hashed at once on the calling thread: nothing moves between
 * threads (with 2 CPUs shared with the pipe's reader or with QEMU, a worker
 * cost more in wake-ups and buffer hand-offs than it saved).
 */
export class InlinePieceDigester implements PieceDigester {
  private open = -1;
  onChunkDigest: ((chunk: number, crc: number) => void) | null = null;

  constructor(private readonly hasher: ChunkHasher) {}

  pieces(data: Buffer | null, items: number[]): void {
    const h = this.hasher;
    for (let i = 0; i < items.length; i += 5) {
      const chunk = items[i];
      if (chunk !== this.open) {
        if (this.open >= 0) throw new QemuSnapError(`digest pieces of chunk ${chunk} while chunk ${this.open} is still open`);
        h.begin();
        this.open = chunk;
      }
      const start = items[i + 1];
      const end = items[i + 2];
      if (data && end > start) h.update(data.subarray(start, end));
      if (items[i + 3] > 0) h.zeros(items[i + 3]);
      if (items[i + 4] !== 0) {
        this.open = -1;
        this.onChunkDigest?.(chunk, h.end());
      }
    }
  }
}
