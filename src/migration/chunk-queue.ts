const EMPTY = Buffer.alloc(0);

/**
 * Pending input: a list of chunks and a read position. Reads that fit in the
 * head chunk are views into it; only fields that straddle chunks are copied.
 */
export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head: Buffer = EMPTY;
  private pos = 0;
  /** locate()'s cursor: a chunk index and the queue position where that chunk starts. */
  private cursorChunk = 0;
  private cursorBase = 0;
  /** Bytes not yet consumed. */
  available = 0;
  /** Absolute stream offset of the next unconsumed byte. */
  consumed = 0;

  /** The chunk holding the read position, and where in it that is. */
  get headChunk(): Buffer {
    return this.head;
  }

  get headPos(): number {
    return this.pos;
  }

  push(chunk: Buffer): void {
    if (this.chunks.length === 0) {
      this.head = chunk;
      this.pos = 0;
    }
    this.chunks.push(chunk);
    this.available += chunk.length;
  }

  byteAt(rel: number): number {
    const i = this.pos + rel;
    const head = this.head;
    if (i < head.length) return head[i];
    const k = this.locate(i);
    if (k >= this.chunks.length) throw new RangeError('ChunkQueue.byteAt past the end');
    return this.chunks[k][i - this.cursorBase];
  }

  /**
   * Index of the chunk holding queue position i (pos + rel), found from a
   * cursor: the device-state tail search probes candidates front to back
   * over up to 64 MiB held back in many chunks, and walking from the first
   * chunk for each probe made it quadratic (a minute for 48 MiB).
   */
  private locate(i: number): number {
    let k = this.cursorChunk;
    let base = this.cursorBase;
    if (i < base) {
      if (k > 0 && i >= base - this.chunks[k - 1].length) {
        k--;
        base -= this.chunks[k].length;
      } else {
        k = 0;
        base = 0;
      }
    }
    while (k < this.chunks.length && i >= base + this.chunks[k].length) {
      base += this.chunks[k].length;
      k++;
    }
    this.cursorChunk = k;
    this.cursorBase = base;
    return k;
  }

  u16At(rel: number): number {
    const i = this.pos + rel;
    if (i + 2 <= this.head.length) return this.head.readUInt16BE(i);
    return (this.byteAt(rel) << 8) | this.byteAt(rel + 1);
  }

  u32At(rel: number): number {
    const i = this.pos + rel;
    if (i + 4 <= this.head.length) return this.head.readUInt32BE(i);
    return this.byteAt(rel) * 0x1000000 + ((this.byteAt(rel + 1) << 16) | (this.byteAt(rel + 2) << 8) | this.byteAt(rel + 3));
  }

  /** True when `bytes` appear at `rel`. */
  equalsAt(rel: number, bytes: Buffer): boolean {
    const i = this.pos + rel;
    if (i + bytes.length <= this.head.length) {
      return this.head.compare(bytes, 0, bytes.length, i, i + bytes.length) === 0;
    }
    for (let k = 0; k < bytes.length; k++) if (this.byteAt(rel + k) !== bytes[k]) return false;
    return true;
  }

  stringAt(rel: number, n: number): string {
    const i = this.pos + rel;
    if (i + n <= this.head.length) return this.head.toString('latin1', i, i + n);
    return this.copyAt(rel, n).toString('latin1');
  }

  copyAt(rel: number, n: number): Buffer {
    // Chunk by chunk: a page straddling two pipe reads is common (every
    // ~16th page with 64 KiB reads), and a byte loop over byteAt made it
    // the framer's hottest function.
    const out = Buffer.allocUnsafe(n);
    let skip = this.pos + rel;
    let done = 0;
    for (let k = 0; k < this.chunks.length && done < n; k++) {
      const c = this.chunks[k];
      if (skip >= c.length) {
        skip -= c.length;
        continue;
      }
      const take = Math.min(c.length - skip, n - done);
      c.copy(out, done, skip, skip + take);
      done += take;
      skip = 0;
    }
    if (done < n) throw new RangeError('ChunkQueue.copyAt past the end');
    return out;
  }

  /** Relative index of the next `byte` at or after `rel`, or -1. */
  indexOf(byte: number, rel: number): number {
    const i = this.pos + rel;
    let k = this.locate(i);
    let b = this.cursorBase;
    for (; k < this.chunks.length; k++) {
      const c = this.chunks[k];
      const at = c.indexOf(byte, Math.max(i - b, 0));
      if (at >= 0) {
        this.cursorChunk = k;
        this.cursorBase = b;
        return b + at - this.pos;
      }
      b += c.length;
    }
    return -1;
  }

  skip(n: number): void {
    this.pos += n;
    this.consumed += n;
    this.available -= n;
    while (this.pos >= this.head.length && this.chunks.length > 0) {
      this.pos -= this.head.length;
      this.chunks.shift();
      this.cursorChunk = 0;
      this.cursorBase = 0;
      this.head = this.chunks.length > 0 ? this.chunks[0] : EMPTY;
    }
  }

  /** n bytes: a view when they lie in one chunk, else a copy. */
  take(n: number): Buffer {
    const i = this.pos;
    let out: Buffer;
    if (i + n <= this.head.length) out = this.head.subarray(i, i + n);
    else out = this.copyAt(0, n);
    this.skip(n);
    return out;
  }

  /** The longest view (at most n bytes) available at the read position, without consuming. */
  headView(n: number): Buffer {
    return this.head.subarray(this.pos, Math.min(this.head.length, this.pos + n));
  }
}
