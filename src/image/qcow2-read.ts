import { readSync } from 'fs';
import type { FileHandle } from 'fs/promises';
import { Qcow2Error } from './errors';
import { readFully } from './refcount';
import { FLAG_COMPRESSED } from './l2-cache';
import type { L2Cache } from './l2-cache';
import type { CompressedClusters } from './compressed';
import type { GuestDataFile } from './qcow2';

/** Where walkRead() sends the pieces of a guest range, by output offset. */
interface ReadSink {
  /** `length` bytes at host offset `host`. */
  run(at: number, length: number, host: number): void;
  /** `length` bytes of zeros (a hole or a zero cluster). */
  zeros(at: number, length: number): void;
  /** Part of a compressed cluster; returns false to stop the walk. */
  compressed(at: number, length: number, hi: number, lo: number, inCluster: number): boolean;
}

/** Map a guest range to host reads into `out` from `outOffset` on; null if an L2 table went missing meanwhile. */
export function planRead(l2: L2Cache, compressed: CompressedClusters, dataFile: GuestDataFile | null, virtualSize: number, offset: number, length: number, out: Buffer, outOffset: number): Promise<void>[] | null {
  const tasks: Promise<void>[] = [];
  const data = offset < virtualSize ? dataFile : null;
  const mapped = walkRead(l2, offset, length, outOffset, {
    run: (at, n, host) => void tasks.push(data ? data.read(out, at, n, host) : readRun(l2.fh, out, at, n, host)),
    zeros: (at, n) => void out.fill(0, at, at + n),
    compressed: (at, n, hi, lo, inCluster) => {
      tasks.push(compressed.inflate(hi, lo).then((data) => void data.copy(out, at, inCluster, inCluster + n)));
      return true;
    },
  });
  return mapped ? tasks : null;
}

/**
 * Walks how guest bytes [offset, offset+length) lie in the file, telling
 * `sink` where each piece goes in the output (from `outOffset` on):
 * contiguous host ranges as one run, holes and zero clusters as zeros,
 * compressed clusters one by one. False when an L2 table of the range is
 * not in memory, or when sink.compressed() says stop.
 */
export function walkRead(l2: L2Cache, offset: number, length: number, outOffset: number, sink: ReadSink): boolean {
  const cs = l2.clusterSize;
  const l2Span = cs * l2.l2Entries;
  const end = offset + length;
  for (let l1i = Math.floor(offset / l2Span); l1i <= Math.floor((end - 1) / l2Span); l1i++) {
    if (l2.tableOffset(l1i) !== 0 && !l2.tables.has(l1i)) return false;
  }
  let runHost = -1;
  let runOut = 0;
  let runLen = 0;
  const endRun = (): void => {
    if (runLen > 0) sink.run(runOut, runLen, runHost);
    runLen = 0;
  };
  let pos = offset;
  while (pos < end) {
    const gci = Math.floor(pos / cs);
    const inCluster = pos - gci * cs;
    const n = Math.min(cs - inCluster, end - pos);
    const at = outOffset + pos - offset;
    const l1i = Math.floor(gci / l2.l2Entries);
    const table = l2.tableOffset(l1i) === 0 ? undefined : l2.tables.get(l1i);
    pos += n;
    if (!table) {
      endRun();
      sink.zeros(at, n);
      continue;
    }
    const j = gci - l1i * l2.l2Entries;
    const hi = table.readUInt32BE(j * 8);
    const lo = table.readUInt32BE(j * 8 + 4);
    if ((hi & FLAG_COMPRESSED) !== 0) {
      endRun();
      if (!sink.compressed(at, n, hi, lo, inCluster)) return false;
      continue;
    }
    const host = l2.standardOffset(hi, lo, l1i, j);
    if ((lo & 1) !== 0 || host === 0) {
      endRun();
      sink.zeros(at, n);
      continue;
    }
    if (runLen > 0 && runHost + runLen === host + inCluster) {
      runLen += n;
    } else {
      endRun();
      runHost = host + inCluster;
      runOut = at;
      runLen = n;
    }
  }
  endRun();
  return true;
}

export function readRun(fh: FileHandle, out: Buffer, at: number, length: number, host: number): Promise<void> {
  return fh.read(out, at, length, host).then(({ bytesRead }) => {
    // Short: past the end of the file (allocated, not yet written) reads as zeros.
    if (bytesRead < length) return readFully(fh, out.subarray(at + bytesRead, at + length), host + bytesRead);
  });
}

/** readRun() with pread(2) on this thread; short reads past the end of the file are zeros. */
export function readRunSync(fh: FileHandle, path: string, out: Buffer, at: number, length: number, host: number): void {
  let done = 0;
  while (done < length) {
    let n: number;
    try {
      n = readSync(fh.fd, out, at + done, length - done, host + done);
    } catch (err) {
      throw new Qcow2Error(path, `read of ${length - done} bytes failed: ${(err as Error).message}`, host + done);
    }
    if (n === 0) {
      out.fill(0, at + done, at + length);
      return;
    }
    done += n;
  }
}
