// Worker thread: CRC-32 of RAM chunks, off the main thread (which parses or
// encodes the stream) on the machine's other core.
//   whole: a chunk in one buffer; also counts the pages that hold data, so
//          `verify` can check the STVM header's data-page count.
//   piece: a chunk in consecutive pieces (data, or a run of zeros for a
//          hole), as the loader reads it; the CRC is posted with the last.
import { parentPort } from 'node:worker_threads';
import * as zlib from 'node:zlib';

type Job =
  | { kind: 'whole'; id: number; data: Uint8Array; pageSize: number }
  | { kind: 'piece'; chunk: number; data: Uint8Array | null; start: number; end: number; zeros: number; final: boolean };

const port = parentPort;
if (!port) throw new Error('digest-worker must run as a worker thread');
let zeroPage = Buffer.alloc(4096);
const zeroRun = Buffer.alloc(1 << 20);
const partial = new Map<number, number>();

function crcZeros(n: number, crc: number): number {
  for (; n > 0; n -= zeroRun.length) crc = zlib.crc32(zeroRun.subarray(0, Math.min(n, zeroRun.length)), crc);
  return crc;
}

port.on('message', (job: Job) => {
  if (job.kind === 'piece') {
    let crc = partial.get(job.chunk) ?? 0;
    if (job.data) crc = zlib.crc32(Buffer.from(job.data.buffer, job.data.byteOffset + job.start, job.end - job.start), crc);
    if (job.zeros > 0) crc = crcZeros(job.zeros, crc);
    if (job.final) {
      partial.delete(job.chunk);
      port.postMessage({ chunk: job.chunk, crc });
    } else {
      partial.set(job.chunk, crc);
    }
    return;
  }
  const data = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
  const crc = zlib.crc32(data);
  const ps = job.pageSize;
  if (zeroPage.length !== ps) zeroPage = Buffer.alloc(ps);
  let dataPages = 0;
  for (let off = 0; off + ps <= data.length; off += ps) {
    if (data.compare(zeroPage, 0, ps, off, off + ps) !== 0) dataPages++;
  }
  port.postMessage({ id: job.id, crc, dataPages });
});
