import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pipeline, Readable, Writable } from 'streamx';
import {
  BlockRead,
  BlockReaderEndedError,
  BlockReadError,
  BlockReadSource,
  BlockWrite,
  InvalidBlockReadError,
  OrderedBlockReader,
  OrderedBlockWriter,
  ReadPlanEntry,
} from '../../src/blockio';
import { prng, sleep, tick } from '../helpers';

// ---- helpers ---------------------------------------------------------------

const rng = prng;

const unhandled: unknown[] = [];
process.on('unhandledRejection', (e) => unhandled.push(e));

/** Content of the fake disk: every byte is a function of its offset. */
function contentAt(offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 2654435761) >>> 24;
  return b;
}

/** A source with random latency that records what it was asked to read. */
class FakeSource implements BlockReadSource {
  inFlight = 0;
  maxInFlight = 0;
  readonly reads: number[] = [];
  constructor(private readonly delay: () => number) {}
  async read(offset: number, length: number): Promise<Buffer> {
    this.reads.push(offset);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await sleep(this.delay());
    this.inFlight--;
    return contentAt(offset, length);
  }
}

/** A source whose reads complete only when the test says so. */
class GatedSource implements BlockReadSource {
  readonly pending: Array<{ offset: number; length: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }> = [];
  readonly issued: number[] = [];
  onIssue: ((offset: number) => void) | null = null;
  read(offset: number, length: number): Promise<Buffer> {
    this.issued.push(offset);
    const p = new Promise<Buffer>((resolve, reject) => this.pending.push({ offset, length, resolve, reject }));
    if (this.onIssue !== null) this.onIssue(offset);
    return p;
  }
  release(offset: number): void {
    const i = this.pending.findIndex((p) => p.offset === offset);
    if (i < 0) throw new Error(`no pending read at ${offset}`);
    const p = this.pending.splice(i, 1)[0];
    p.resolve(contentAt(p.offset, p.length));
  }
  releaseAll(): void {
    while (this.pending.length > 0) this.release(this.pending[0].offset);
  }
}

function collect(r: OrderedBlockReader): { out: BlockRead[]; done: Promise<Error | null> } {
  const out: BlockRead[] = [];
  const sink = new Writable({
    write(data: unknown, cb: (err: Error | null) => void) {
      out.push(data as BlockRead);
      cb(null);
    },
  });
  const done = new Promise<Error | null>((resolve) => pipeline(r, sink, (err) => resolve(err ?? null)));
  return { out, done };
}

function page(i: number, hole = false, size = 4096): ReadPlanEntry {
  return { offset: i * size, length: size, hole, tag: i };
}

// ---- tests -----------------------------------------------------------------

test('emits in plan order, never reads holes, keeps at most N reads in flight', async () => {
  const rand = rng(11);
  const plan: ReadPlanEntry[] = [];
  for (let i = 0; i < 1200; i++) plan.push(page(i, rand() < 0.3, 4096));
  const src = new FakeSource(() => rand() * 3);
  const r = new OrderedBlockReader(src, plan, { maxInFlight: 8 });
  const { out, done } = collect(r);
  assert.is(await done, null);
  assert.is(out.length, plan.length);
  for (let i = 0; i < plan.length; i++) {
    const o = out[i];
    assert.is(o.offset, plan[i].offset);
    assert.is(o.tag, i);
    assert.is(o.urgent, false);
    if (plan[i].hole) assert.is(o.data, null);
    else assert.ok(o.data !== null && o.data.equals(contentAt(o.offset, 4096)), `data of entry ${i}`);
  }
  const holes = new Set(plan.filter((p) => p.hole).map((p) => p.offset));
  assert.ok(src.reads.every((off) => !holes.has(off)), 'no hole was read');
  assert.is(src.reads.length, plan.length - holes.size, 'each data entry read once');
  assert.ok(src.maxInFlight <= 8, `max in flight ${src.maxInFlight}`);
  assert.ok(src.maxInFlight >= 4, `reads actually ran in parallel (${src.maxInFlight})`);
});

test('the plan is consumed lazily; backpressure bounds reads issued', async () => {
  const size = 4096;
  const hwm = 64 * 1024;
  const N = 4;
  const ringSize = 8;
  let pulled = 0;
  function* plan(): Generator<ReadPlanEntry> {
    for (let i = 0; i < 5000; i++) {
      pulled++;
      yield page(i, false, size);
    }
  }
  const src = new FakeSource(() => 0);
  const r = new OrderedBlockReader(src, plan(), { maxInFlight: N, ringSize, highWaterMark: hwm });
  r.resume(); // start, then stall: nobody reads
  r.pause();
  await sleep(50);
  const bound = ringSize + hwm / size + 1;
  assert.ok(src.reads.length > 0, 'it started');
  assert.ok(src.reads.length <= bound, `${src.reads.length} reads issued with no consumer (bound ${bound})`);
  assert.ok(pulled <= bound + 1, `${pulled} plan entries pulled`);

  // Now consume slowly; issued - consumed stays bounded the whole way.
  let consumed = 0;
  let worst = 0;
  for await (const item of r) {
    const b = item as BlockRead;
    assert.is(b.offset, consumed * size);
    consumed++;
    worst = Math.max(worst, src.reads.length - consumed);
    if (consumed % 500 === 0) await sleep(1);
  }
  assert.is(consumed, 5000);
  assert.ok(worst <= bound, `issued but unconsumed reached ${worst} > ${bound}`);
});

test('holes are throttled by backpressure too', async () => {
  let pulled = 0;
  function* plan(): Generator<ReadPlanEntry> {
    for (let i = 0; i < 100000; i++) {
      pulled++;
      yield page(i, true);
    }
  }
  const r = new OrderedBlockReader(new FakeSource(() => 0), plan(), { highWaterMark: 64 * 64 });
  r.resume();
  r.pause();
  await sleep(20);
  assert.ok(pulled > 0 && pulled <= 64 + 2, `${pulled} holes pulled with no consumer`);
  let n = 0;
  for await (const _ of r) n++;
  assert.is(n, 100000);
});

test('urgent lane: issued at once, emitted ahead of background, each lane in its own order', async () => {
  const src = new GatedSource();
  const plan = Array.from({ length: 10 }, (_, i) => page(i));
  const r = new OrderedBlockReader(src, plan, { maxInFlight: 2 });
  const { out, done } = collect(r);
  const names = () => out.map((o) => (o.urgent ? `u${o.tag}` : `b${o.tag}`));
  await tick();
  assert.equal(src.issued, [0, 4096], 'two background reads in flight');

  r.urgent({ offset: 1 << 20, length: 4096, hole: false, tag: 1 });
  r.urgent({ offset: 2 << 20, length: 4096, hole: false, tag: 2 });
  assert.equal(src.issued, [0, 4096, 1 << 20, 2 << 20], 'urgent reads issued right away, past the full background lane');
  src.release(2 << 20);
  await tick();
  assert.equal(names(), [], 'u2 waits for u1');
  src.release(1 << 20);
  await tick();
  assert.equal(names(), ['u1', 'u2']);

  src.release(4096); // b1 done, b0 not: b1 parked
  await tick();
  assert.equal(names(), ['u1', 'u2']);
  r.urgent({ offset: 3 << 20, length: 4096, hole: false, tag: 3 });
  r.urgent({ offset: 5 << 20, length: 4096, hole: true, tag: 4 }); // an urgent hole: not read, but after u3
  assert.ok(!src.issued.includes(5 << 20));
  src.release(3 << 20);
  await tick();
  assert.equal(names(), ['u1', 'u2', 'u3', 'u4'], 'urgent results overtake the parked b1');
  src.release(0);
  await tick();
  assert.equal(names(), ['u1', 'u2', 'u3', 'u4', 'b0', 'b1']);
  // The urgent request jumps ahead of background reads not yet issued.
  const issuedBefore = src.issued.length;
  r.urgent({ offset: 6 << 20, length: 4096, hole: false, tag: 6 });
  assert.is(src.issued[issuedBefore], 6 << 20);

  while (src.pending.length > 0 || out.length < 15) {
    src.releaseAll();
    await tick();
  }
  assert.is(await done, null);
  const n = names();
  assert.equal(n.filter((x) => x.startsWith('b')), plan.map((_, i) => `b${i}`));
  assert.equal(n.filter((x) => x.startsWith('u')), ['u1', 'u2', 'u3', 'u4', 'u6']);
  const u6 = out.find((o) => o.tag === 6 && o.urgent);
  assert.ok(u6 !== undefined && u6.data !== null && u6.data.equals(contentAt(6 << 20, 4096)));
});

test('urgent lane under random latency: lanes keep order; urgent never waits behind background', async () => {
  const rand = rng(12);
  const completedAt = new Map<number, number>(); // urgent offset -> event counter at completion
  let clock = 0;
  const src: BlockReadSource = {
    async read(offset, length) {
      await sleep(rand() * 4);
      if (offset >= 1 << 30) completedAt.set(offset, ++clock);
      return contentAt(offset, length);
    },
  };
  const plan = Array.from({ length: 800 }, (_, i) => page(i, rand() < 0.2));
  const r = new OrderedBlockReader(src, plan, { maxInFlight: 6, maxUrgentInFlight: 3 });
  r.holdOpen(true);
  const out: Array<BlockRead & { at: number }> = [];
  r.on('data', (d: unknown) => out.push({ ...(d as BlockRead), at: ++clock }));
  const ended = once(r, 'end');
  const urgentOffsets: number[] = [];
  for (let k = 0; k < 60; k++) {
    await sleep(rand() * 3);
    const off = (1 << 30) + k * 4096;
    urgentOffsets.push(off);
    r.urgent({ offset: off, length: 4096, hole: false, tag: k });
  }
  r.holdOpen(false);
  await ended;
  const bg = out.filter((o) => !o.urgent);
  const ug = out.filter((o) => o.urgent);
  assert.equal(bg.map((o) => o.tag), plan.map((_, i) => i));
  assert.equal(ug.map((o) => o.offset), urgentOffsets);
  // Once an urgent read (and every earlier urgent one) is done, no background
  // result may be emitted before it.
  let prevReady = 0;
  for (const u of ug) {
    const ready = Math.max(prevReady, completedAt.get(u.offset) as number);
    const overtaken = bg.filter((b) => b.at > ready && b.at < u.at);
    assert.is(overtaken.length, 0, `urgent ${u.tag} overtaken by ${overtaken.length} background results`);
    prevReady = ready;
  }
});

test('holdOpen keeps the stream open for urgent requests after the plan ends', async () => {
  const src = new FakeSource(() => 1);
  const r = new OrderedBlockReader(src, [page(0), page(1, true), page(2)]);
  r.holdOpen(true);
  const { out, done } = collect(r);
  let ended = false;
  r.on('end', () => (ended = true));
  await sleep(30);
  assert.is(out.length, 3);
  assert.is(ended, false, 'held open');
  r.urgent({ offset: 4096, length: 4096, hole: false, tag: 9 });
  await sleep(20);
  assert.is(out.length, 4);
  assert.ok(out[3].urgent && out[3].data !== null && out[3].data.equals(contentAt(4096, 4096)));
  assert.is(ended, false);
  r.urgent({ offset: 8192, length: 4096, hole: false, tag: 10 });
  r.holdOpen(false); // released while an urgent read is still pending: it is still emitted
  assert.is(await done, null);
  assert.is(out.length, 5);
  assert.is(out[4].tag, 10);
  assert.throws(() => r.urgent(page(3)), (e: unknown) => e instanceof BlockReaderEndedError);
});

test('setMaxInFlight is respected; backgroundInFlightWhenUrgent caps background while urgent is pending', async () => {
  const src = new GatedSource();
  const plan = Array.from({ length: 200 }, (_, i) => page(i));
  const r = new OrderedBlockReader(src, plan, { maxInFlight: 8, backgroundInFlightWhenUrgent: 1 });
  const { out, done } = collect(r);
  let phase = 'start';
  const worst: Record<string, number> = {};
  src.onIssue = (offset) => {
    if (offset >= 1 << 30) return; // urgent reads have their own lane
    worst[phase] = Math.max(worst[phase] ?? 0, r.backgroundInFlight);
  };
  await tick();
  assert.is(src.pending.length, 8);

  phase = 'low';
  r.setMaxInFlight(2);
  for (let k = 0; k < 40; k++) {
    src.release(src.pending[0].offset);
    await tick();
  }
  assert.ok(src.pending.length <= 2, `${src.pending.length} reads pending after lowering to 2`);
  assert.is(worst.low, 2, 'new background reads only while fewer than 2 are out');

  phase = 'urgent';
  r.urgent({ offset: 1 << 30, length: 4096, hole: false, tag: 0 });
  // Drain the background until only one is out; urgent stays pending.
  for (let k = 0; k < 10; k++) {
    const bgPending = src.pending.filter((p) => p.offset < 1 << 30);
    if (bgPending.length > 0) src.release(bgPending[0].offset);
    await tick();
  }
  assert.is(worst.urgent, 1, 'while urgent is pending, at most one background read');
  src.release(1 << 30);
  await tick();

  phase = 'high';
  r.setMaxInFlight(6);
  await tick();
  assert.is(r.backgroundInFlight, 6);
  while (out.length < 201) {
    src.releaseAll();
    await tick();
  }
  assert.is(await done, null);
  assert.is(worst.high, 6);
  assert.equal(worst.start, 8);
});

test('a source error destroys the stream; close waits for reads in flight; no unhandled rejections', async () => {
  const rand = rng(13);
  let inFlight = 0;
  const src: BlockReadSource = {
    async read(offset, length) {
      inFlight++;
      await sleep(rand() * 3);
      inFlight--;
      if (offset >= 50 * 4096) throw new Error('EIO: bad sector');
      return contentAt(offset, length);
    },
  };
  const plan = Array.from({ length: 300 }, (_, i) => page(i));
  const r = new OrderedBlockReader(src, plan, { maxInFlight: 8 });
  let inFlightAtClose = -1;
  r.on('close', () => (inFlightAtClose = inFlight));
  const { out, done } = collect(r);
  const err = await done;
  assert.instance(err, BlockReadError);
  const e = err as BlockReadError;
  assert.ok(e.offset >= 50 * 4096);
  assert.match(e.message, /EIO: bad sector/);
  assert.ok(out.length <= 50);
  await sleep(20);
  assert.is(inFlightAtClose, 0);
  assert.equal(unhandled, []);
});

test('short reads, bad plan entries and a throwing plan destroy the stream', async () => {
  const short = new OrderedBlockReader({ read: async () => Buffer.alloc(10) }, [page(0)]);
  const e1 = await collect(short).done;
  assert.instance(e1, BlockReadError);
  assert.match((e1 as Error).message, /offset 0 .*returned 10 bytes/);

  const bad = new OrderedBlockReader(new FakeSource(() => 0), [page(0), { offset: -5, length: 1, hole: false }]);
  assert.instance(await collect(bad).done, InvalidBlockReadError);

  function* throwing(): Generator<ReadPlanEntry> {
    yield page(0);
    throw new Error('plan broke');
  }
  const thr = new OrderedBlockReader(new FakeSource(() => 0), throwing());
  const e3 = await collect(thr).done;
  assert.is((e3 as Error).message, 'plan broke');
  assert.equal(unhandled, []);
});

test('round trip through a real file: writer then reader', async () => {
  const rand = rng(14);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'blockio-'));
  const file = path.join(dir, 'disk.img');
  const fh = await fsp.open(file, 'w+');
  try {
    const pages = 512;
    const size = 4096;
    const order = Array.from({ length: pages }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = (rand() * (i + 1)) | 0;
      [order[i], order[j]] = [order[j], order[i]];
    }
    const written = new Set(order.slice(0, 400)); // the rest stay holes
    const writes: BlockWrite[] = [...written].map((i) => ({
      offset: i * size,
      length: size,
      buffers: [contentAt(i * size, size)],
    }));
    const w = new OrderedBlockWriter(
      { writev: async (off, bufs) => void (await fh.writev(bufs, off)) },
      { maxInFlight: 8 },
    );
    await new Promise<void>((resolve, reject) =>
      pipeline(Readable.from(writes), w, (err) => (err ? reject(err) : resolve())),
    );

    const source: BlockReadSource = {
      async read(offset, length) {
        const buf = Buffer.allocUnsafe(length);
        const { bytesRead } = await fh.read(buf, 0, length, offset);
        return bytesRead === length ? buf : buf.subarray(0, bytesRead);
      },
    };
    const plan = Array.from({ length: pages }, (_, i) => page(i, !written.has(i), size));
    const r = new OrderedBlockReader(source, plan, { maxInFlight: 8 });
    let i = 0;
    for await (const item of r) {
      const b = item as BlockRead;
      assert.is(b.offset, i * size);
      if (written.has(i)) assert.ok(b.data !== null && b.data.equals(contentAt(i * size, size)), `page ${i}`);
      else assert.is(b.data, null);
      i++;
    }
    assert.is(i, pages);
  } finally {
    await fh.close();
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test.run();
