// The 32-bit digest of one RAM chunk, fed incrementally.
//
// Version 1 of our digest extension used CRC-32; version 2 uses the low 32
// bits of XXH64 (seed 0). Node's zlib.crc32 has no SIMD here and ran at
// 4.7 GB/s, a quarter of save's and load's CPU; XXH64 runs at ~10 GB/s in
// WebAssembly (hash-wasm) and ~14 GB/s in the native module, which also
// hashes the caller's memory where WebAssembly must copy it in first. The
// digest is there to catch a damaged image, not an adversary. Images with
// version 1 are still checked with CRC-32.
import * as zlib from 'node:zlib';
import type { IHasher } from 'hash-wasm';
import { native, NativeModule } from '../util/native';

type CreateXXHash64 = (seedLow?: number, seedHigh?: number) => Promise<IHasher>;

/**
 * hash-wasm's per-algorithm build (9 KB) rather than its main bundle of
 * every algorithm (280 KB, ~7 ms of start-up to parse), and only when the
 * native module is not there to hash.
 */
function createXXHash64(): Promise<IHasher> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require('hash-wasm/dist/xxhash64.umd.min.js') as { createXXHash64: CreateXXHash64 };
  return mod.createXXHash64(0, 0);
}

export type DigestAlgorithm = 'crc32' | 'xxh64';

/** One chunk at a time: begin, update/zeros in order, end. */
export interface ChunkHasher {
  readonly algorithm: DigestAlgorithm;
  begin(): void;
  update(data: Uint8Array): void;
  /** update() with the bytes `count` segments describe (see NativeModule.writeSegments); only where the hasher can. */
  updateSegments?(buffers: Buffer[], segments: Float64Array, count: number): void;
  /**
   * Copies the bytes `count` segments describe to `into` (from its start)
   * and feeds them to update() in the same pass; only where the hasher can.
   */
  copySegments?(into: Buffer, buffers: Buffer[], segments: Float64Array, count: number): void;
  /** `n` zero bytes (a hole reads as zeros). */
  zeros(n: number): void;
  /** The digest of what was fed since begin(), as an unsigned 32-bit number. */
  end(): number;
  /** The digest of `data` alone (must not be called between begin and end). */
  whole(data: Uint8Array): number;
  /** The digest of `length` zero bytes, cached: what an unallocated chunk has. */
  zeroChunk(length: number): number;
}

const ZEROS = new Uint8Array(1 << 20);

abstract class BaseHasher implements ChunkHasher {
  abstract readonly algorithm: DigestAlgorithm;
  private readonly zeroDigests = new Map<number, number>();
  abstract begin(): void;
  abstract update(data: Uint8Array): void;
  abstract end(): number;

  zeros(n: number): void {
    for (; n > 0; n -= ZEROS.length) this.update(n >= ZEROS.length ? ZEROS : ZEROS.subarray(0, n));
  }

  whole(data: Uint8Array): number {
    this.begin();
    this.update(data);
    return this.end();
  }

  zeroChunk(length: number): number {
    let d = this.zeroDigests.get(length);
    if (d === undefined) {
      this.begin();
      this.zeros(length);
      d = this.end();
      this.zeroDigests.set(length, d);
    }
    return d;
  }
}

class Crc32Hasher extends BaseHasher {
  readonly algorithm = 'crc32';
  private crc = 0;

  begin(): void {
    this.crc = 0;
  }

  update(data: Uint8Array): void {
    this.crc = zlib.crc32(data, this.crc);
  }

  end(): number {
    return this.crc >>> 0;
  }
}

class Xxh64Hasher extends BaseHasher {
  readonly algorithm = 'xxh64';

  constructor(private readonly h: IHasher) {
    super();
  }

  begin(): void {
    this.h.init();
  }

  update(data: Uint8Array): void {
    this.h.update(data);
  }

  end(): number {
    // The canonical (big-endian) digest: its last four bytes are the low 32 bits.
    const d = this.h.digest('binary');
    return ((d[4] << 24) | (d[5] << 16) | (d[6] << 8) | d[7]) >>> 0;
  }
}

class NativeXxh64Hasher extends BaseHasher {
  readonly algorithm = 'xxh64';
  // Buffer.alloc: its own 8-aligned memory, as the native state needs.
  private readonly state: Buffer;
  readonly copySegments?: (into: Buffer, buffers: Buffer[], segments: Float64Array, count: number) => void;

  constructor(private readonly mod: NativeModule) {
    super();
    this.state = Buffer.alloc(mod.xxh64StateBytes);
    mod.xxh64Reset(this.state);
    const copy = mod.copySegments;
    if (copy !== undefined) this.copySegments = (into, buffers, segments, count) => void copy(into, buffers, segments, count, this.state);
  }

  begin(): void {
    this.mod.xxh64Reset(this.state);
  }

  update(data: Uint8Array): void {
    this.mod.xxh64Update(this.state, data);
  }

  updateSegments(buffers: Buffer[], segments: Float64Array, count: number): void {
    this.mod.xxh64UpdateSegments(this.state, buffers, segments, count);
  }

  end(): number {
    return this.mod.xxh64Low(this.state);
  }
}

/** A hasher for `algorithm`; `useNative: false` forces the WebAssembly XXH64 (tests compare the two). */
export async function createChunkHasher(algorithm: DigestAlgorithm, useNative = true): Promise<ChunkHasher> {
  if (algorithm === 'crc32') return new Crc32Hasher();
  const mod = useNative ? native() : null;
  return mod ? new NativeXxh64Hasher(mod) : new Xxh64Hasher(await createXXHash64());
}
