// Worker thread: digests of whole RAM chunks for `verify`, off the main
// thread (which reads the image) on the machine's other core. Also counts
// the pages that hold data, so `verify` can check the STVM header's
// data-page count.
import { parentPort } from 'node:worker_threads';
import { createChunkHasher, ChunkHasher, DigestAlgorithm } from './chunk-hash';

interface Job {
  id: number;
  data: Uint8Array;
  pageSize: number;
  algorithm: DigestAlgorithm;
}

const port = parentPort;
if (!port) throw new Error('digest-worker must run as a worker thread');
let zeroPage = Buffer.alloc(4096);
const hashers = new Map<DigestAlgorithm, Promise<ChunkHasher>>();

port.on('message', (job: Job) => {
  let hasher = hashers.get(job.algorithm);
  if (!hasher) {
    hasher = createChunkHasher(job.algorithm);
    hashers.set(job.algorithm, hasher);
  }
  // Jobs are independent: answering one after another's hasher is ready keeps them apart.
  hasher.then(
    (h) => {
      const data = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
      const crc = h.whole(data);
      const ps = job.pageSize;
      if (zeroPage.length !== ps) zeroPage = Buffer.alloc(ps);
      let dataPages = 0;
      for (let off = 0; off + ps <= data.length; off += ps) {
        if (data.compare(zeroPage, 0, ps, off, off + ps) !== 0) dataPages++;
      }
      port.postMessage({ id: job.id, crc, dataPages });
    },
    (err: Error) => port.postMessage({ id: job.id, error: err.message }),
  );
});
