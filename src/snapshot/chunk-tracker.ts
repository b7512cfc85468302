// Save side of the RAM digests: the CRC-32 of every chunk of the virtual
// disk, computed from the writes themselves as they are issued.
//
// A source sends RAM in passes over ascending addresses, so the writes into
// a chunk usually arrive in order: each extends the chunk's running CRC (a
// gap between two writes is a hole, which reads as zeros). A write that
// lands before the end of what the chunk already covered (a live VM
// re-sending a page, or writes issued out of order) makes the chunk dirty:
// it is read back from the image and digested at the end, when nothing can
// change it any longer. Reading every chunk back instead cost a second pass
// over 1 GiB, page faults on fresh buffers and a worker hop per chunk.
import * as zlib from 'node:zlib';
import { DIGEST_CHUNK_SIZE, zeroChunkCrc } from './digests';

interface ChunkSource {
  read(offset: number, length: number): Promise<Buffer>;
}

const UNTOUCHED = 0;
const OPEN = 1;
const DIRTY = 2;

const ZEROS = Buffer.alloc(64 * 1024);

/** CRC-32 of `crc`'s message followed by `n` zero bytes. */
function crcZeros(n: number, crc: number): number {
  for (; n > 0; n -= ZEROS.length) crc = zlib.crc32(n >= ZEROS.length ? ZEROS : ZEROS.subarray(0, n), crc);
  return crc;
}

export class ChunkTracker {
  private readonly state: Uint8Array;
  /** Bytes of the chunk covered so far (OPEN): the running CRC is over [0, covered). */
  private readonly covered: Uint32Array;
  readonly table: Uint32Array;
  private readonly chunkSize = DIGEST_CHUNK_SIZE;

  constructor(
    private readonly source: ChunkSource,
    private readonly virtualSize: number,
  ) {
    const n = Math.ceil(virtualSize / this.chunkSize);
    this.state = new Uint8Array(n);
    this.covered = new Uint32Array(n);
    this.table = new Uint32Array(n);
  }

  /** A write of `buffers` at disk `offset` was issued (before any later write to the same range). */
  write(offset: number, buffers: readonly Buffer[]): void {
    let at = offset;
    for (const b of buffers) {
      let used = 0;
      while (used < b.length) {
        const c = Math.floor(at / this.chunkSize);
        const rel = at - c * this.chunkSize;
        const n = Math.min(b.length - used, this.chunkSize - rel);
        this.extend(c, rel, b.subarray(used, used + n));
        used += n;
        at += n;
      }
    }
  }

  private extend(c: number, rel: number, piece: Buffer): void {
    const st = this.state[c];
    if (st === DIRTY) return;
    if (st === UNTOUCHED) {
      this.state[c] = OPEN;
      this.covered[c] = 0;
      this.table[c] = 0;
    }
    const covered = this.covered[c];
    if (rel < covered) {
      this.state[c] = DIRTY;
      return;
    }
    let crc = this.table[c];
    if (rel > covered) crc = crcZeros(rel - covered, crc);
    this.table[c] = zlib.crc32(piece, crc);
    this.covered[c] = rel + piece.length;
  }

  /** After the last write completed: closes every chunk and returns the table. */
  async finish(): Promise<Uint32Array> {
    for (let c = 0; c < this.state.length; c++) {
      const len = this.chunkLength(c);
      switch (this.state[c]) {
        case UNTOUCHED:
          this.table[c] = zeroChunkCrc(len);
          break;
        case OPEN:
          this.table[c] = crcZeros(len - this.covered[c], this.table[c]) >>> 0;
          break;
        default:
          this.table[c] = zlib.crc32(await this.source.read(c * this.chunkSize, len)) >>> 0;
      }
    }
    return this.table;
  }

  /** Chunks that had to be read back (a write landed behind an earlier one). */
  get dirtyChunks(): number {
    let n = 0;
    for (let c = 0; c < this.state.length; c++) if (this.state[c] === DIRTY) n++;
    return n;
  }

  private chunkLength(c: number): number {
    return Math.min(this.chunkSize, this.virtualSize - c * this.chunkSize);
  }
}
