// Worker thread: CRC-32 of RAM chunks, off the main thread (which parses or
// encodes the stream) on the machine's other core. It also counts the pages
// that hold data, so `verify` can check the STVM header's data-page count.
import { parentPort } from 'node:worker_threads';
import * as zlib from 'node:zlib';

interface Job {
  id: number;
  data: Uint8Array;
  pageSize: number;
}

const port = parentPort;
if (!port) throw new Error('digest-worker must run as a worker thread');
let zero = Buffer.alloc(4096);

port.on('message', (job: Job) => {
  const data = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
  const crc = zlib.crc32(data);
  const ps = job.pageSize;
  if (zero.length !== ps) zero = Buffer.alloc(ps);
  let dataPages = 0;
  for (let off = 0; off + ps <= data.length; off += ps) {
    if (data.compare(zero, 0, ps, off, off + ps) !== 0) dataPages++;
  }
  port.postMessage({ id: job.id, crc, dataPages });
});
