import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pipeline, Readable } from 'streamx';
import { QemuSnapError } from '../../src/errors';
import {
  BlockWrite,
  BlockWriteError,
  BlockWriteTarget,
  InvalidBlockWriteError,
  OrderedBlockWriter,
} from '../../src/blockio';
import { prng, sleep, tick } from '../helpers';

// ---- helpers ---------------------------------------------------------------

const rng = prng;

const unhandled: unknown[] = [];
process.on('unhandledRejection', (e) => unhandled.push(e));

function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (rand() * 256) | 0;
  return b;
}

/** Split `data` into 1..3 buffers so multi-buffer writes are exercised. */
function asWrite(rand: () => number, offset: number, data: Buffer): BlockWrite {
  const buffers: Buffer[] = [];
  let pos = 0;
  const pieces = 1 + ((rand() * 3) | 0);
  for (let i = 0; i < pieces - 1 && pos < data.length; i++) {
    const cut = pos + ((rand() * (data.length - pos)) | 0);
    buffers.push(data.subarray(pos, cut));
    pos = cut;
  }
  buffers.push(data.subarray(pos));
  return { offset, length: data.length, buffers };
}

/**
 * In-memory disk with random latency. Data lands when the write completes,
 * like a real device, so two overlapping writes in flight at once could
 * land in the wrong order: the writer must never let that happen.
 */
class MemTarget implements BlockWriteTarget {
  readonly mem: Buffer;
  inFlight = 0;
  maxInFlight = 0;
  calls = 0;
  overlapViolations = 0;
  private readonly active: Array<{ start: number; end: number }> = [];
  constructor(size: number, private readonly delay: () => number) {
    this.mem = Buffer.alloc(size);
  }
  async writev(offset: number, buffers: Buffer[]): Promise<void> {
    this.calls++;
    const data = Buffer.concat(buffers);
    const r = { start: offset, end: offset + data.length };
    for (const a of this.active) if (a.start < r.end && r.start < a.end) this.overlapViolations++;
    this.active.push(r);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await sleep(this.delay());
    data.copy(this.mem, offset);
    this.active.splice(this.active.indexOf(r), 1);
    this.inFlight--;
  }
}

/** A target whose writes complete only when the test says so. */
class GatedTarget implements BlockWriteTarget {
  readonly pending: Array<{ offset: number; length: number; resolve: () => void; reject: (e: Error) => void }> = [];
  readonly issued: number[] = [];
  writev(offset: number, buffers: Buffer[]): Promise<void> {
    this.issued.push(offset);
    let length = 0;
    for (const b of buffers) length += b.length;
    return new Promise<void>((resolve, reject) => this.pending.push({ offset, length, resolve, reject }));
  }
  release(offset: number): void {
    const i = this.pending.findIndex((p) => p.offset === offset);
    if (i < 0) throw new Error(`no pending write at ${offset}`);
    this.pending.splice(i, 1)[0].resolve();
  }
}

function runPipeline(writes: BlockWrite[], w: OrderedBlockWriter): Promise<Error | null> {
  return new Promise((resolve) => pipeline(Readable.from(writes), w, (err) => resolve(err ?? null)));
}

// ---- tests -----------------------------------------------------------------

test('completions are reported in submission order; never more than N in flight', async () => {
  const rand = rng(1);
  const target = new MemTarget(600 * 4096, () => rand() * 3);
  const seen: number[] = [];
  const progress: number[] = [];
  const writes: BlockWrite[] = [];
  for (let i = 0; i < 600; i++) writes.push(asWrite(rand, i * 4096, randomBytes(rand, 4096)));
  const reported: BlockWrite[] = [];
  const w = new OrderedBlockWriter(target, {
    maxInFlight: 8,
    onComplete: (bw, seq) => {
      seen.push(seq);
      reported.push(bw);
    },
  });
  w.on('progress', (_bw, seq) => progress.push(seq));
  const err = await runPipeline(writes, w);
  assert.is(err, null);
  const expected = writes.map((_, i) => i);
  assert.equal(seen, expected);
  assert.equal(progress, expected);
  for (let i = 0; i < writes.length; i++) assert.ok(reported[i] === writes[i], `write ${i} reported as itself`);
  assert.ok(target.maxInFlight <= 8, `max in flight ${target.maxInFlight}`);
  assert.ok(target.maxInFlight >= 4, `writes actually ran in parallel (${target.maxInFlight})`);
  assert.is(w.bytesWritten, 600 * 4096);
  assert.is(w.inFlight, 0);
  assert.is(target.calls, 600);
});

test('overlapping writes never run together and the last one wins', async () => {
  const rand = rng(2);
  const size = 64 * 1024;
  const target = new MemTarget(size, () => rand() * 2);
  const expected = Buffer.alloc(size);
  const writes: BlockWrite[] = [];
  for (let i = 0; i < 3000; i++) {
    const len = 1 + ((rand() * 8192) | 0);
    const off = (rand() * (size - len)) | 0;
    const data = randomBytes(rand, len);
    data.copy(expected, off);
    writes.push(asWrite(rand, off, data));
  }
  const w = new OrderedBlockWriter(target, { maxInFlight: 6 });
  assert.is(await runPipeline(writes, w), null);
  assert.is(target.overlapViolations, 0);
  assert.ok(target.mem.equals(expected), 'final content = writes applied in submission order');
  assert.ok(target.maxInFlight > 1, 'disjoint writes still overlapped in time');
});

test('an overlapping write waits; a disjoint one is issued past it; completions stay ordered', async () => {
  const target = new GatedTarget();
  const order: number[] = [];
  const w = new OrderedBlockWriter(target, { maxInFlight: 8, onComplete: (_bw, seq) => order.push(seq) });
  const mk = (offset: number, length: number): BlockWrite => ({ offset, length, buffers: [Buffer.alloc(length)] });
  w.write(mk(0, 4096)); // A
  w.write(mk(2048, 4096)); // B overlaps A
  w.write(mk(8192, 4096)); // C disjoint
  w.write(mk(5000, 100)); // D overlaps only B (which is waiting)
  await tick();
  assert.equal(target.issued, [0, 8192], 'A and C issued, B and D held');
  assert.is(w.inFlight, 2);
  target.release(8192); // C finishes first
  await tick();
  assert.equal(order, [], 'C is not reported before A and B');
  target.release(0);
  await tick();
  assert.equal(target.issued, [0, 8192, 2048], 'B issued once A finished; D still waits for B');
  assert.equal(order, [0]);
  target.release(2048);
  await tick();
  assert.equal(target.issued, [0, 8192, 2048, 5000]);
  assert.equal(order, [0, 1, 2]);
  w.end();
  let finished = false;
  w.on('finish', () => (finished = true));
  await tick();
  assert.is(finished, false, 'finish waits for the last write');
  target.release(5000);
  await once(w, 'close');
  assert.is(finished, true);
  assert.equal(order, [0, 1, 2, 3]);
});

test('backpressure: a slow target holds the producer back; memory is bounded', async () => {
  const rand = rng(3);
  const target = new GatedTarget();
  const N = 4;
  const ring = 8;
  const size = 4096;
  const hwm = 64 * 1024;
  const total = 300;
  let reported = 0;
  let landed = 0; // completed by the target
  const w = new OrderedBlockWriter(target, {
    maxInFlight: N,
    ringSize: ring,
    highWaterMark: hwm,
    onComplete: () => reported++,
  });
  const closed = once(w, 'close');
  let accepted = 0;
  let maxNotLanded = 0;
  let maxNotReported = 0;

  const produce = (async () => {
    for (let i = 0; i < total; i++) {
      accepted++;
      maxNotLanded = Math.max(maxNotLanded, accepted - landed);
      maxNotReported = Math.max(maxNotReported, accepted - reported);
      if (!w.write({ offset: i * size, length: size, buffers: [Buffer.alloc(size, i & 255)] })) await once(w, 'drain');
    }
    w.end();
  })();

  await sleep(30);
  assert.ok(accepted < total, `producer stalled (${accepted} accepted)`);
  assert.ok(accepted <= N + hwm / size, `${accepted} accepted > ${N + hwm / size}`);
  assert.is(w.inFlight, N, 'the ring is full');
  assert.is(target.pending.length, N);

  // Let the target trickle, completing in random order.
  while (reported < total) {
    if (target.pending.length === 0) {
      await tick();
      continue;
    }
    const i = (rand() * target.pending.length) | 0;
    target.release(target.pending[i].offset);
    landed++;
    await tick();
    assert.ok(target.pending.length <= N);
  }
  await produce;
  await closed;
  assert.ok(maxNotLanded <= N + hwm / size, `accepted but not landed ${maxNotLanded} > ${N + hwm / size}`);
  assert.ok(maxNotReported <= ring + hwm / size, `accepted but not reported ${maxNotReported} > ${ring + hwm / size}`);
  assert.ok(maxNotReported > N, 'random completion order did park finished writes in the ring');
  assert.is(reported, total);
});

test('a target error destroys the stream: no further writes, no unhandled rejections, close after settle', async () => {
  const rand = rng(4);
  let calls = 0;
  let inFlight = 0;
  let callsAtError = -1;
  const target: BlockWriteTarget = {
    async writev(offset) {
      calls++;
      inFlight++;
      await sleep(rand() * 3);
      inFlight--;
      // Every write from #20 on fails, so several rejections arrive after the first.
      if (offset >= 20 * 512) {
        if (callsAtError < 0) callsAtError = calls;
        throw new Error('EIO: i/o error');
      }
    },
  };
  const writes: BlockWrite[] = [];
  for (let i = 0; i < 200; i++) writes.push({ offset: i * 512, length: 512, buffers: [Buffer.alloc(512)] });
  const w = new OrderedBlockWriter(target, { maxInFlight: 8 });
  let inFlightAtClose = -1;
  w.on('close', () => (inFlightAtClose = inFlight));
  const err = await runPipeline(writes, w);
  assert.instance(err, BlockWriteError);
  const e = err as BlockWriteError;
  assert.ok(e.offset >= 20 * 512 && e.offset % 512 === 0);
  assert.match(e.message, /EIO/);
  assert.match(e.message, new RegExp(`offset ${e.offset}`));
  assert.is((e.cause as Error).message, 'EIO: i/o error');
  await sleep(20);
  assert.ok(calls - callsAtError < 8, `only writes already issued ran after the error (${calls - callsAtError})`);
  assert.ok(calls < 200);
  assert.is(inFlightAtClose, 0, "'close' waits for issued writes to settle");
  assert.equal(unhandled, []);
});

test('QemuSnapErrors from the target pass through unchanged; sync throws are caught', async () => {
  class ClusterError extends QemuSnapError {}
  const mine = new ClusterError('cluster 7 is corrupt');
  const w1 = new OrderedBlockWriter({ writev: () => Promise.reject(mine) });
  assert.is(await runPipeline([{ offset: 0, length: 1, buffers: [Buffer.alloc(1)] }], w1), mine);
  const w2 = new OrderedBlockWriter({
    writev: () => {
      throw new Error('sync boom');
    },
  });
  const err = await runPipeline([{ offset: 4096, length: 1, buffers: [Buffer.alloc(1)] }], w2);
  assert.instance(err, BlockWriteError);
  assert.is((err as BlockWriteError).offset, 4096);
  assert.equal(unhandled, []);
});

test('invalid writes are rejected with the offending range', async () => {
  const w = new OrderedBlockWriter(new MemTarget(1024, () => 0));
  const err = await runPipeline([{ offset: 10, length: 5, buffers: [Buffer.alloc(4)] }], w);
  assert.instance(err, InvalidBlockWriteError);
  assert.match((err as Error).message, /offset 10 .*buffers hold 4 bytes/);
  const w2 = new OrderedBlockWriter(new MemTarget(1024, () => 0));
  const err2 = await runPipeline([{ offset: -1, length: 0, buffers: [] }], w2);
  assert.instance(err2, InvalidBlockWriteError);
});

test('zero-length writes do not stall the queue', async () => {
  const target = new MemTarget(4096, () => 0);
  let n = 0;
  const w = new OrderedBlockWriter(target, { onComplete: () => n++ });
  const writes: BlockWrite[] = [];
  for (let i = 0; i < 10; i++) writes.push({ offset: i, length: 0, buffers: [] });
  writes.push({ offset: 0, length: 4, buffers: [Buffer.from('abcd')] });
  assert.is(await runPipeline(writes, w), null);
  assert.is(n, 11);
  assert.is(target.mem.subarray(0, 4).toString(), 'abcd');
});

test('end to end on a real file (FileHandle.writev at a position)', async () => {
  const rand = rng(5);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'blockio-'));
  const file = path.join(dir, 'disk.img');
  const fh = await fsp.open(file, 'w+');
  try {
    const size = 1024 * 1024;
    await fh.truncate(size);
    const expected = Buffer.alloc(size);
    const writes: BlockWrite[] = [];
    for (let i = 0; i < 1500; i++) {
      const len = 512 * (1 + ((rand() * 32) | 0));
      const off = 512 * ((rand() * ((size - len) / 512)) | 0);
      const data = randomBytes(rand, len);
      data.copy(expected, off);
      writes.push(asWrite(rand, off, data));
    }
    const target: BlockWriteTarget = {
      async writev(offset, buffers) {
        let want = 0;
        for (const b of buffers) want += b.length;
        const { bytesWritten } = await fh.writev(buffers, offset);
        if (bytesWritten !== want) throw new Error(`short write ${bytesWritten}/${want}`);
      },
    };
    const w = new OrderedBlockWriter(target, { maxInFlight: 16 });
    assert.is(await runPipeline(writes, w), null);
    const got = await fsp.readFile(file);
    assert.is(got.length, size);
    assert.ok(got.equals(expected), 'file content = writes applied in order');
  } finally {
    await fh.close();
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test.run();
