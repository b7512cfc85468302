// MultifdMerger's ordering rule against hand-built channels: a page re-sent
// after a sync point wins over its earlier copy whichever channel carried
// either and whichever channel's bytes arrived first; a main-stream record
// after mark k comes after every channel page before SYNC k.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EventEmitter } from 'node:events';
import { MultifdMerger, ChannelSource } from '../../src/migration/multifd-merger';
import type { FramedRecord, RamBlockInfo } from '../../src/migration/records';
import { init, packet, PAGE } from './multifd-packets';

const SYNC = 1;
const BLOCK: RamBlockInfo = { id: 'pc.ram', length: 16 * PAGE, index: 0 };

/** A socket stand-in: emits what the test feeds it, honours pause/resume. */
class FakeChannel extends EventEmitter implements ChannelSource {
  paused = true;
  private queue: Buffer[] = [];
  private ended = false;
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    this.paused = false;
    this.flush();
    return this;
  }
  feed(b: Buffer): void {
    this.queue.push(b);
    this.flush();
  }
  finish(): void {
    this.ended = true;
    this.flush();
  }
  private flush(): void {
    while (!this.paused && this.queue.length > 0) this.emit('data', this.queue.shift());
    if (!this.paused && this.queue.length === 0 && this.ended) {
      this.ended = false;
      this.emit('end');
      this.emit('close');
    }
  }
}

const memSize: FramedRecord = { type: 'ram-mem-size', offset: 0, totalBytes: BLOCK.length, blocks: [BLOCK] };
const eos = (offset: number): FramedRecord => ({ type: 'ram-eos', offset });
const zero = (offset: number, address: number): FramedRecord => ({ type: 'ram-zero', offset, block: BLOCK, address, fill: 0, continued: true });
const tick = () => new Promise((r) => setImmediate(r));

/** Applies the merger's output in order to a RAM image. */
function collect(m: MultifdMerger): { ram: Buffer; done: Promise<void> } {
  const ram = Buffer.alloc(BLOCK.length, 0xee);
  const done = new Promise<void>((resolve, reject) => {
    m.on('data', (rec: unknown) => {
      const r = rec as FramedRecord;
      if (r.type === 'ram-zero') ram.fill(0, r.address, r.address + PAGE);
      if (r.type !== 'ram-page-run') return;
      for (let i = 0; i < r.count; i++) {
        const at = r.dataAt[i];
        if (at >= 0) r.source.copy(ram, r.addresses[i], at, at + PAGE);
        else ram.fill(0, r.addresses[i], r.addresses[i] + PAGE);
      }
    });
    m.on('end', resolve);
    m.on('error', reject);
  });
  return { ram, done };
}

test('a page re-sent after a sync point wins, though its channel delivered first; a main ZERO after the mark wins over an earlier channel page', async () => {
  const m = new MultifdMerger({ channels: 2 });
  const { ram, done } = collect(m);
  const a = new FakeChannel();
  const b = new FakeChannel();
  m.addChannel(a);
  m.addChannel(b);
  // Channel B: the epoch-2 copy of page 1 ('B'), all of it before anything else.
  b.feed(Buffer.concat([init(1), packet({ flags: SYNC }), packet({ flags: SYNC }), packet({ block: 'pc.ram', normal: [PAGE], fill: 0xbb }), packet({ flags: SYNC })]));
  await tick();
  m.write(memSize);
  m.write(eos(100)); // mark 0: setup
  await tick();
  // Channel A: epoch 1 holds the first copy of page 1 ('A') and page 2; it arrives last.
  m.write(eos(200)); // mark 1
  m.write(zero(300, 2 * PAGE)); // after mark 1: page 2 became zero
  m.write(eos(400)); // mark 2
  await tick();
  a.feed(Buffer.concat([init(0), packet({ flags: SYNC }), packet({ block: 'pc.ram', normal: [PAGE, 2 * PAGE], fill: 0xaa }), packet({ flags: SYNC }), packet({ flags: SYNC })]));
  m.end(undefined);
  await done;
  assert.is(ram[PAGE], 0xbb, 'page 1 holds the copy sent after the sync point');
  assert.is(ram[2 * PAGE], 0, 'page 2 holds the ZERO the main stream sent after mark 1');
  assert.is(ram[0], 0xee, 'page 0 untouched');
  assert.is(m.pages, 3);
});

test('packets of one epoch are merged by address across channels, whichever channel delivered first', async () => {
  const m = new MultifdMerger({ channels: 2 });
  const order: number[] = [];
  const { done } = collect(m);
  m.on('data', (r: unknown) => {
    const rec = r as FramedRecord;
    if (rec.type === 'ram-page-run') order.push(rec.addresses[0] / PAGE);
  });
  const a = new FakeChannel();
  const b = new FakeChannel();
  m.addChannel(a);
  m.addChannel(b);
  m.write(memSize);
  m.write(eos(100));
  b.feed(Buffer.concat([init(1), packet({ flags: SYNC }), ...[1, 3, 4].map((p) => packet({ block: 'pc.ram', normal: [p * PAGE] })), packet({ flags: SYNC })]));
  await tick();
  a.feed(Buffer.concat([init(0), packet({ flags: SYNC }), ...[0, 2, 5].map((p) => packet({ block: 'pc.ram', normal: [p * PAGE] })), packet({ flags: SYNC })]));
  m.write(eos(200));
  m.end(undefined);
  await done;
  assert.equal(order, [0, 1, 2, 3, 4, 5]);
});

test('MULTIFD_FLUSH marks sync points when the stream has them (first mark decides), and is not passed on', async () => {
  const m = new MultifdMerger({ channels: 1 });
  const types: string[] = [];
  const { done } = collect(m);
  m.on('data', (r: unknown) => void types.push((r as FramedRecord).type));
  const a = new FakeChannel();
  m.addChannel(a);
  m.write(memSize);
  m.write({ type: 'ram-multifd-flush', offset: 10 });
  m.write(eos(20)); // not a sync point in flush mode: passes without a SYNC
  await tick();
  assert.equal(types, ['ram-mem-size'], 'the flush waits for the channel SYNC');
  a.feed(Buffer.concat([init(0), packet({ flags: SYNC }), packet({ block: 'pc.ram', normal: [0] })]));
  await tick();
  // The page (epoch 1) and the EOS after the flush are of one epoch: either order.
  assert.equal(types.slice().sort(), ['ram-eos', 'ram-mem-size', 'ram-page-run'], 'the flush itself is dropped');
  m.end(undefined);
  await done;
});

test('a channel that closes before a sync point it owes fails the merge, naming it', async () => {
  const m = new MultifdMerger({ channels: 2 });
  const { done } = collect(m);
  const a = new FakeChannel();
  const b = new FakeChannel();
  m.addChannel(a);
  m.addChannel(b);
  m.write(memSize);
  a.feed(Buffer.concat([init(0), packet({ flags: SYNC })]));
  b.feed(Buffer.concat([init(1), packet({ flags: SYNC })]));
  m.write(eos(100));
  a.feed(packet({ flags: SYNC }));
  b.finish();
  m.write(eos(200));
  try {
    await done;
    assert.unreachable('should fail');
  } catch (err) {
    assert.match((err as Error).message, /multifd channel 1 closed before sync point 2/);
  }
});

test('more channels than asked for are refused', async () => {
  const m = new MultifdMerger({ channels: 1 });
  const { done } = collect(m);
  m.addChannel(new FakeChannel());
  m.addChannel(new FakeChannel());
  try {
    await done;
    assert.unreachable('should fail');
  } catch (err) {
    assert.match((err as Error).message, /more multifd channels than the 1 asked for/);
  }
});

test.run();
