// Save side of the RAM digests: the digest of every chunk of the virtual
// disk, computed from the writes themselves as they are issued.
//
// A source sends RAM in passes over ascending addresses, so the writes into
// a chunk usually arrive in order, and a chunk is finished when the writes
// move on to another: the open chunk's digest is extended by each write (a
// gap between two writes is a hole, which reads as zeros) and closed with
// zeros up to its end when a write lands elsewhere. A write that lands
// before the end of what its chunk already covered, or in a chunk already
// closed (a live VM re-sending a page), makes the chunk dirty: it is read
// back from the image and digested at the end, when nothing can change it
// any longer. Reading every chunk back instead cost a second pass over
// 1 GiB, page faults on fresh buffers and a worker hop per chunk.
import type { ChunkHasher } from './chunk-hash';
import { DIGEST_CHUNK_SIZE } from './digests';
import { copySegmentsInto } from './run-buffers';

interface ChunkSource {
  read(offset: number, length: number): Promise<Buffer>;
}

const UNTOUCHED = 0;
const OPEN = 1;
const CLOSED = 2;
const DIRTY = 3;

export class ChunkTracker {
  private readonly state: Uint8Array;
  readonly table: Uint32Array;
  private readonly chunkSize = DIGEST_CHUNK_SIZE;
  /** The chunk whose digest the hasher holds, or -1. */
  private open = -1;
  /** Bytes of the open chunk covered so far. */
  private covered = 0;

  constructor(
    private readonly source: ChunkSource,
    private readonly virtualSize: number,
    private readonly hasher: ChunkHasher,
  ) {
    const n = Math.ceil(virtualSize / this.chunkSize);
    this.state = new Uint8Array(n);
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

  /** Whether writeSegments() can take this write: the hasher digests segments and the write stays in one chunk (the save's runs do). */
  acceptsSegments(offset: number, length: number): boolean {
    const rel = offset % this.chunkSize;
    return this.hasher.updateSegments !== undefined && rel + length <= this.chunkSize;
  }

  /** write() for a write described by segments (see Qcow2Image.writeSegmentsSync); acceptsSegments() must be true. */
  writeSegments(offset: number, length: number, buffers: Buffer[], segments: Float64Array, count: number): void {
    if (!this.acceptsSegments(offset, length)) throw new RangeError(`segments write of ${length} bytes at ${offset} needs write()`);
    const c = Math.floor(offset / this.chunkSize);
    const rel = offset - c * this.chunkSize;
    if (!this.begin(c, rel)) return;
    this.hasher.updateSegments?.(buffers, segments, count);
    this.covered = rel + length;
  }

  /**
   * A write about to be issued from `into`, which does not hold its bytes
   * yet: copies them there from the segments and digests them in the same
   * pass where the hasher can (one trip through memory instead of two),
   * otherwise copies, then digests as write() would.
   */
  copySegments(offset: number, length: number, into: Buffer, buffers: Buffer[], segments: Float64Array, count: number): void {
    const rel = offset % this.chunkSize;
    const copy = this.hasher.copySegments;
    if (copy === undefined || rel + length > this.chunkSize) {
      copySegmentsInto(into, buffers, segments, count);
      return this.write(offset, [into.subarray(0, length)]);
    }
    if (!this.begin(Math.floor(offset / this.chunkSize), rel)) return void copySegmentsInto(into, buffers, segments, count);
    copy(into, buffers, segments, count);
    this.covered = rel + length;
  }

  private extend(c: number, rel: number, piece: Buffer): void {
    if (!this.begin(c, rel)) return;
    this.hasher.update(piece);
    this.covered = rel + piece.length;
  }

  /**
   * Makes chunk `c` the open one, ready for bytes at `rel`, with zeros fed
   * for any gap. False when the chunk cannot be digested from its writes
   * (it is dirty now): the caller feeds nothing.
   */
  private begin(c: number, rel: number): boolean {
    if (c !== this.open) {
      this.closeOpen();
      const st = this.state[c];
      if (st !== UNTOUCHED) {
        this.state[c] = DIRTY;
        return false;
      }
      this.state[c] = OPEN;
      this.open = c;
      this.covered = 0;
      this.hasher.begin();
    }
    if (rel < this.covered) {
      // Behind what the digest already holds: the hasher state is useless now.
      this.state[c] = DIRTY;
      this.open = -1;
      return false;
    }
    if (rel > this.covered) this.hasher.zeros(rel - this.covered);
    return true;
  }

  /** Finishes the open chunk's digest: zeros up to its end. */
  private closeOpen(): void {
    const c = this.open;
    if (c < 0) return;
    this.open = -1;
    this.hasher.zeros(this.chunkLength(c) - this.covered);
    this.table[c] = this.hasher.end();
    this.state[c] = CLOSED;
  }

  /** After the last write completed: closes every chunk and returns the table. */
  async finish(): Promise<Uint32Array> {
    this.closeOpen();
    for (let c = 0; c < this.state.length; c++) {
      const len = this.chunkLength(c);
      if (this.state[c] === UNTOUCHED) this.table[c] = this.hasher.zeroChunk(len);
      else if (this.state[c] === DIRTY) this.table[c] = this.hasher.whole(await this.source.read(c * this.chunkSize, len));
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
