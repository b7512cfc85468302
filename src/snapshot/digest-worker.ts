// Worker thread: CRC-32 of RAM chunks, off the main thread (which parses or
// encodes the stream) on the machine's other core.
//   whole: a chunk in one buffer; also counts the pages that hold data, so
//          `verify` can check the STVM header's data-page count.
//   pieces: chunks in consecutive pieces (data, or a run of zeros for a
//          hole), as the loader reads them, several per message; the CRCs
//          of the chunks a message closes are posted in one answer.
import { parentPort } from 'node:worker_threads';
import * as zlib from 'node:zlib';
import { applyPieces } from './crc-pieces';

type Job =
  | { kind: 'whole'; id: number; data: Uint8Array; pageSize: number }
  // items: groups of (chunk, start, end, zeros, final); see ChunkDigester.pieces().
  | { kind: 'pieces'; data: Uint8Array | null; items: number[] };

const port = parentPort;
if (!port) throw new Error('digest-worker must run as a worker thread');
let zeroPage = Buffer.alloc(4096);
const partial = new Map<number, number>();

port.on('message', (job: Job) => {
  if (job.kind === 'pieces') {
    // The CRCs of the chunks this message closes, answered in one message.
    const crcs: number[] = [];
    applyPieces(partial, job.data, job.items, crcs);
    if (crcs.length > 0) port.postMessage({ crcs });
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
