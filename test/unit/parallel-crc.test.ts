// ParallelCrc: chunk CRCs from pieces hashed on the worker equal zlib's over
// the same bytes, for random layouts (zeros, chunks across slots and jobs,
// pieces without a slot, buffers from outside the ring) with small rings
// that wrap many times; a slot comes back only after the worker is done
// with it (the producer scribbles over each slot it gets back); the chunk
// count may come after the worker started; bad input is refused with one
// clear error.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as zlib from 'node:zlib';
import { prng } from '../helpers';
import { ParallelCrc, ParallelCrcError, ParallelCrcOptions } from '../../src/snapshot/parallel-crc';

interface Segment {
  /** Bytes, or null for a run of zeros fed without data. */
  data: Buffer | null;
  length: number;
}

/**
 * Feeds `chunks` chunks made of random segments through `crc`: each data
 * segment is cut into reads at random places (so chunks and reads cross
 * each other), each read goes into an acquired slot, which is scribbled
 * over the moment it is acquired again. Returns the expected CRC per chunk.
 */
function feed(crc: ParallelCrc, chunks: number, seed: number, opts: { maxSegment: number; outside?: boolean }): Map<number, number> {
  const r = prng(seed);
  const want = new Map<number, number>();
  const got = new Map<number, number>();
  const take = (c: number, v: number) => {
    assert.not.ok(got.has(c), `chunk ${c} reported once`);
    got.set(c, v);
  };
  let slot: Buffer | null = null;
  let fill = 0;
  let items: number[] = [];
  const submit = () => {
    if (items.length === 0) return;
    crc.submit(slot ? slot.subarray(0, fill) : null, items);
    items = [];
    slot = null;
    fill = 0;
    crc.takeClosed(take);
  };
  for (let c = 0; c < chunks; c++) {
    const parts: Buffer[] = [];
    const segments = 1 + Math.floor(r() * 5);
    for (let s = 0; s < segments; s++) {
      const length = 1 + Math.floor(r() * opts.maxSegment);
      const zero = r() < 0.3;
      const seg: Segment = { data: zero ? null : Buffer.alloc(length), length };
      if (seg.data) for (let i = 0; i < length; i++) seg.data[i] = (r() * 256) | 0;
      parts.push(seg.data ?? Buffer.alloc(length));
      const final = s === segments - 1;
      if (!seg.data) {
        // Zeros: after the last data piece when there is one in this job, else a piece of their own.
        if (items.length > 0 && items[items.length - 5] === c && items[items.length - 1] === 0) {
          items[items.length - 2] += length;
          items[items.length - 1] = final ? 1 : 0;
        } else {
          items.push(c, 0, 0, length, final ? 1 : 0);
        }
        if (r() < 0.3) submit();
        continue;
      }
      let at = 0;
      while (at < length) {
        if (!slot) {
          slot = opts.outside && r() < 0.3 ? Buffer.alloc(crc.slotSize) : crc.acquireSlot();
          // Whatever the worker still had to read from this slot is done: scribble.
          slot.fill(0xa5);
          fill = 0;
        }
        const n = Math.min(length - at, crc.slotSize - fill, 1 + Math.floor(r() * opts.maxSegment));
        seg.data.copy(slot, fill, at, at + n);
        at += n;
        items.push(c, fill, fill + n, 0, final && at === length ? 1 : 0);
        fill += n;
        if (fill === crc.slotSize || r() < 0.4) submit();
      }
    }
    want.set(c, zlib.crc32(Buffer.concat(parts)) >>> 0);
  }
  submit();
  crc.flush();
  crc.takeClosed(take);
  assert.equal([...got.keys()].sort((a, b) => a - b), [...want.keys()].sort((a, b) => a - b), 'every chunk reported');
  return new Map([...want].map(([c, v]) => [c, v - (got.get(c) ?? -1)]));
}

/** late: the chunk count comes after the worker started (setChunks), as load does. */
async function withRing(opts: ParallelCrcOptions & { late?: boolean }, fn: (crc: ParallelCrc) => void | Promise<void>): Promise<void> {
  // A broken hand-off shows as a stall: fail in seconds, not 30.
  const crc = new ParallelCrc({ stallMs: 5000, ...opts, chunks: opts.late ? undefined : opts.chunks });
  try {
    if (opts.late) {
      assert.throws(() => crc.submit(null, [0, 0, 0, 1, 1]), (err: Error) => err instanceof ParallelCrcError && /before the chunk count/.test(err.message));
      await new Promise((r) => setTimeout(r, 50)); // the worker is up and asleep before it has a table
      crc.setChunks(opts.chunks ?? 0);
      assert.throws(() => crc.setChunks(1), (err: Error) => err instanceof ParallelCrcError && /already/.test(err.message));
    }
    await fn(crc);
  } finally {
    await crc.close();
  }
}

test('random layouts: every CRC equals zlib over the same bytes (small rings wrap many times)', async () => {
  for (const [seed, opts] of [
    [1, { chunks: 200, slots: 3, slotSize: 4096, jobCapacity: 4, pieceCapacity: 8 }],
    [2, { chunks: 300, slots: 2, slotSize: 1000, jobCapacity: 2, pieceCapacity: 3 }],
    [3, { chunks: 100, slots: 8, slotSize: 64 << 10, wakeBatch: 3, late: true }],
    [4, { chunks: 60, slots: 4, slotSize: 16 << 10, jobCapacity: 8, late: true }],
  ] as Array<[number, ParallelCrcOptions & { late?: boolean }]>) {
    const chunks = opts.chunks ?? 0;
    await withRing(opts, (crc) => {
      const diff = feed(crc, chunks, seed, { maxSegment: (opts.slotSize ?? 4096) * 1.5 });
      for (const [c, d] of diff) assert.is(d, 0, `seed ${seed}: chunk ${c}`);
      assert.ok(crc.jobsQueued > 4 * (opts.slots ?? 12), `seed ${seed}: the ring went round many times (${crc.jobsQueued} jobs)`);
      assert.is(crc.jobsDone, crc.jobsQueued);
      assert.is(crc.closedCount, chunks);
      for (let c = 0; c < chunks; c++) assert.ok(crc.crcOf(c) !== undefined, `chunk ${c} closed`);
    });
  }
});

test('buffers from outside the ring are copied into a slot first', async () => {
  await withRing({ chunks: 80, slots: 3, slotSize: 8192 }, (crc) => {
    const diff = feed(crc, 80, 9, { maxSegment: 12000, outside: true });
    for (const [c, d] of diff) assert.is(d, 0, `chunk ${c}`);
  });
});

test('a slot comes back only once the worker is done with it (a sleeping worker is woken to finish)', async () => {
  // The worker is never woken by submit (wake batch beyond reach) and each
  // slot's job is slow (1 MiB, 64 pieces): had acquireSlot() returned the
  // slot early, the scribble would land in bytes not yet hashed.
  const size = 1 << 20;
  await withRing({ chunks: 40, slots: 2, slotSize: size, wakeBatch: 1000 }, (crc) => {
    const want: number[] = [];
    const got = new Map<number, number>();
    const bufs = new Set<ArrayBufferLike | number>();
    for (let c = 0; c < 40; c++) {
      const slot = crc.acquireSlot();
      assert.ok(crc.jobsDone >= c - 1, `slot ${c % 2} is free: jobs done ${crc.jobsDone}, job ${c - 2} used it`);
      bufs.add(slot.byteOffset);
      slot.fill(0xff);
      for (let i = 0; i < size; i += 4096) slot.writeUInt32LE(c * 1000 + i, i);
      const items: number[] = [];
      for (let k = 0; k < 64; k++) items.push(c, k * (size / 64), (k + 1) * (size / 64), 0, k === 63 ? 1 : 0);
      want.push(zlib.crc32(slot) >>> 0);
      crc.submit(slot, items);
      crc.takeClosed((ch, v) => got.set(ch, v));
    }
    crc.flush();
    crc.takeClosed((ch, v) => got.set(ch, v));
    assert.is(bufs.size, 2, 'two slots, taken in turn');
    for (let c = 0; c < 40; c++) assert.is(got.get(c), want[c], `chunk ${c}`);
  });
});

test('zeros without a slot; CRCs reported in closing order; flush with nothing queued returns', async () => {
  await withRing({ chunks: 4, slots: 2, slotSize: 4096 }, (crc) => {
    crc.flush();
    crc.submit(null, [2, 0, 0, 5000, 0]);
    crc.submit(null, [2, 0, 0, 3000, 1, 0, 0, 0, 1 << 20, 1]);
    const order: number[] = [];
    crc.flush();
    crc.takeClosed((c, v) => {
      order.push(c);
      assert.is(v, zlib.crc32(Buffer.alloc(c === 2 ? 8000 : 1 << 20)) >>> 0, `chunk ${c}`);
    });
    assert.equal(order, [2, 0]);
    assert.is(crc.crcOf(1), undefined, 'chunk 1 never closed');
    assert.is(crc.crcOf(99), undefined);
    assert.is(crc.closedCount, 2);
  });
});

test('bad pieces are refused with one clear error', async () => {
  await withRing({ chunks: 4, slots: 2, slotSize: 4096 }, async (crc) => {
    const slot = crc.acquireSlot();
    const refused = (fn: () => void, re: RegExp) =>
      assert.throws(fn, (err: Error) => err instanceof ParallelCrcError && re.test(err.message) && !err.message.includes('\n'));
    refused(() => crc.submit(slot, [4, 0, 10, 0, 1]), /chunk 4 is outside 0\.\.3/);
    refused(() => crc.submit(slot.subarray(0, 100), [0, 0, 101, 0, 1]), /outside its 100-byte buffer/);
    refused(() => crc.submit(slot, [0, 0, 10, 0]), /groups of five/);
    refused(() => crc.submit(Buffer.alloc(5000), [0, 0, 5000, 0, 1]), /5000 bytes do not fit a 4096-byte slot/);
    await crc.close();
    refused(() => crc.submit(null, [0, 0, 0, 1, 1]), /after close/);
  });
});

test.run();
