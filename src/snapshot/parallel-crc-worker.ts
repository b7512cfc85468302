// Worker thread of ParallelCrc (parallel-crc.ts): takes jobs from the shared
// queue in order, hashes their pieces straight from the shared slots, and
// publishes each job's end in DONE after its CRCs are stored. Sleeps only
// when the queue is empty, and wakes the producer only when it waits.
import { workerData } from 'node:worker_threads';
import * as zlib from 'node:zlib';
import { crcZeros } from './crc-pieces';
import { Ctl, ParallelCrcShared, receiveTable } from './parallel-crc';

const shared = workerData as ParallelCrcShared;
const { ctl, jobs, pieces, data, slotSize } = shared;
let crcs: Uint32Array = new Uint32Array(0);
let closed: Int32Array = new Int32Array(0);
const jobMask = jobs.length / 3 - 1;
const pieceCap = pieces.length / 5;
/** CRCs of chunks still open (their pieces continue in later jobs). */
const partial = new Map<number, number>();

function runJob(job: number): void {
  const r = 3 * (job & jobMask);
  const slot = jobs[r];
  let p = jobs[r + 1];
  const n = jobs[r + 2];
  const base = slot * slotSize;
  for (let k = 0; k < n; k++) {
    const at = 5 * p;
    const chunk = pieces[at];
    const start = pieces[at + 1];
    const end = pieces[at + 2];
    const zeros = pieces[at + 3];
    let crc = partial.get(chunk) ?? 0;
    if (slot >= 0 && end > start) crc = zlib.crc32(data.subarray(base + start, base + end), crc);
    if (zeros > 0) crc = crcZeros(zeros, crc);
    if (pieces[at + 4] !== 0) {
      partial.delete(chunk);
      crcs[chunk] = crc >>> 0;
      Atomics.or(closed, chunk >>> 5, 1 << (chunk & 31));
      Atomics.add(ctl, Ctl.Closed, 1);
    } else {
      partial.set(chunk, crc);
    }
    p = p + 1 === pieceCap ? 0 : p + 1;
  }
}

function loop(): void {
  let tail = 0;
  for (;;) {
    if (Atomics.load(ctl, Ctl.Stop) !== 0) return;
    const head = Atomics.load(ctl, Ctl.Head);
    if (head === tail) {
      // Raise the flag, then wait only while HEAD is still `tail`: a job
      // queued after the flag went up is either seen by the wait's check
      // or followed by the producer's notify.
      Atomics.store(ctl, Ctl.WorkerSleeping, 1);
      Atomics.wait(ctl, Ctl.Head, tail);
      Atomics.store(ctl, Ctl.WorkerSleeping, 0);
      continue;
    }
    if (tail === 0) ({ crcs, closed } = receiveTable(shared));
    for (; tail < head; tail++) {
      runJob(tail);
      Atomics.store(ctl, Ctl.Done, tail + 1);
      if (Atomics.load(ctl, Ctl.ProducerWaiting) !== 0) Atomics.notify(ctl, Ctl.Done);
    }
  }
}

try {
  loop();
} catch (err) {
  Atomics.store(ctl, Ctl.Failed, 1);
  Atomics.notify(ctl, Ctl.Done);
  throw err;
}
