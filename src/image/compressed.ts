import type { FileHandle } from 'fs/promises';
import { inflateRaw, constants as zlibConstants } from 'zlib';
import type { ZlibOptions } from 'zlib';
import { Qcow2Error } from './errors';
import { readFully } from './refcount';
import { TWO32 } from './l2-cache';

function inflateRawAsync(input: Buffer, opts: ZlibOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    inflateRaw(input, opts, (err, out) => (err ? reject(err) : resolve(out)));
  });
}

/**
 * Compressed clusters (docs/interop/qcow2.txt, "Compressed Clusters
 * Descriptor"): where an L2 entry's compressed data lies, and its content
 * inflated, the last one kept for the reads that follow it.
 */
export class CompressedClusters {
  /** Bits 0..(csizeShift-32-1) of the high word hold the compressed offset. */
  private readonly csizeShiftHigh: number;
  private readonly csizeMask: number;
  private readonly clusterSize: number;
  private inflated: { offset: number; data: Promise<Buffer> } | null = null;

  constructor(
    private readonly path: string,
    private readonly fh: FileHandle,
    clusterBits: number,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.csizeShiftHigh = 62 - (clusterBits - 8) - 32;
    this.csizeMask = 2 ** (clusterBits - 8) - 1;
  }

  offset(hi: number, lo: number): number {
    return (hi & (2 ** this.csizeShiftHigh - 1)) * TWO32 + lo;
  }

  sectors(hi: number): number {
    return ((hi >>> this.csizeShiftHigh) & this.csizeMask) + 1;
  }

  inflate(hi: number, lo: number): Promise<Buffer> {
    const coff = this.offset(hi, lo);
    if (this.inflated && this.inflated.offset === coff) return this.inflated.data;
    const csize = this.sectors(hi) * 512 - (coff % 512);
    const data = (async () => {
      const input = Buffer.alloc(csize);
      await readFully(this.fh, input, coff);
      let out: Buffer;
      try {
        // Sync flush: a stream may end exactly where the cluster is full, without an end marker.
        // At most one cluster: a small compressed cluster can claim gigabytes.
        out = await inflateRawAsync(input, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
          throw new Qcow2Error(this.path, `compressed cluster inflates to more than the cluster size (${this.clusterSize} bytes)`, coff);
        }
        throw new Qcow2Error(this.path, `compressed cluster does not inflate: ${(err as Error).message}`, coff);
      }
      if (out.length < this.clusterSize) {
        throw new Qcow2Error(this.path, `compressed cluster inflates to ${out.length} bytes, expected ${this.clusterSize}`, coff);
      }
      return out.length === this.clusterSize ? out : out.subarray(0, this.clusterSize);
    })();
    this.inflated = { offset: coff, data };
    data.catch(() => {
      if (this.inflated?.data === data) this.inflated = null;
    });
    return data;
  }
}
