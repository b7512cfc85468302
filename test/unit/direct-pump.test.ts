// DirectLoadPump: every plan entry reaches the encoder once, in order, with
// the right bytes (synchronous reads, the asynchronous fallback, holes as
// null) in one reused buffer, or in the buffers acquire() hands out; an
// abort or a failed read stops it. Load with the CRC worker writes the same
// stream as with inline CRCs, and stops before the device state on a
// damaged page.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { StreamBuilder, SyntheticBlock } from './synthetic-stream';
import { prng } from '../helpers';
import { saveSnapshot } from '../../src/snapshot/save';
import { loadSnapshot } from '../../src/snapshot/load';
import { DigestMismatchError } from '../../src/snapshot/digests';
import { DirectLoadPump, SyncReadSource } from '../../src/snapshot/direct-pump';
import type { ReadPlanEntry } from '../../src/blockio';
import { BlockReadError } from '../../src/blockio';

/** Byte i of the "disk" is i mod 251; reads at offsets divisible by 3 MiB decline the sync path. */
class FakeSource implements SyncReadSource {
  syncReads = 0;
  asyncReads = 0;
  failAt = -1;
  readIntoSync(offset: number, length: number, out: Buffer, outOffset = 0): boolean {
    if (offset === this.failAt) throw new Error('EIO');
    if (offset % (3 << 20) === 0) return false;
    this.fill(offset, length, out, outOffset);
    this.syncReads++;
    return true;
  }
  async readInto(offset: number, length: number, out: Buffer, outOffset = 0): Promise<void> {
    await new Promise((r) => setTimeout(r, 1));
    this.fill(offset, length, out, outOffset);
    this.asyncReads++;
  }
  private fill(offset: number, length: number, out: Buffer, at: number): void {
    for (let i = 0; i < length; i++) out[at + i] = (offset + i) % 251;
  }
}

function plan(): ReadPlanEntry[] {
  const out: ReadPlanEntry[] = [];
  for (let o = 0; o < 10 << 20; o += 1 << 20) out.push({ offset: o, length: 1 << 20, hole: false, tag: 0 });
  out.push({ offset: 10 << 20, length: 16 << 20, hole: true, tag: 1 });
  out.push({ offset: 26 << 20, length: 4096, hole: false, tag: 1 });
  return out;
}

test('every entry once, in order, with its bytes; holes as null; one buffer', async () => {
  const src = new FakeSource();
  const seen: Array<{ offset: number; length: number; tag?: number; ok: boolean | null }> = [];
  const buffers = new Set<ArrayBufferLike>();
  const p = new DirectLoadPump(src, plan()[Symbol.iterator](), (r) => {
    let ok: boolean | null = null;
    if (r.data) {
      buffers.add(r.data.buffer);
      ok = r.data.length === r.length;
      for (let i = 0; i < r.length && ok; i += 4093) ok = r.data[i] === (r.offset + i) % 251;
    }
    seen.push({ offset: r.offset, length: r.length, tag: r.tag, ok });
  }, { readSize: 1 << 20, yieldEvery: 2 << 20 });
  await p.run();
  assert.equal(seen.map((s) => s.offset), plan().map((e) => e.offset));
  assert.equal(seen.map((s) => s.tag), plan().map((e) => e.tag));
  assert.ok(seen.every((s, i) => (plan()[i].hole ? s.ok === null : s.ok === true)), 'data right, holes null');
  assert.is(src.asyncReads, 4, 'offsets 0, 3, 6 and 9 MiB went the asynchronous way');
  assert.is(src.syncReads, 7);
  assert.is(buffers.size, 1, 'one reused buffer');
});

test('abort stops the pump with its error; a failed read is a BlockReadError', async () => {
  const src = new FakeSource();
  let n = 0;
  const p: DirectLoadPump = new DirectLoadPump(src, plan()[Symbol.iterator](), () => {
    if (++n === 2) p.abort(new Error('stop here'));
  }, { readSize: 1 << 20 });
  try {
    await p.run();
    assert.unreachable('should stop');
  } catch (err) {
    assert.is((err as Error).message, 'stop here');
  }
  assert.is(n, 2, 'nothing encoded after the abort');

  const bad = new FakeSource();
  bad.failAt = 2 << 20;
  const q = new DirectLoadPump(bad, plan()[Symbol.iterator](), () => undefined, { readSize: 1 << 20 });
  try {
    await q.run();
    assert.unreachable('should fail');
  } catch (err) {
    assert.ok(err instanceof BlockReadError, String(err));
    assert.match((err as Error).message, /offset 2097152 .*EIO/);
  }
});

test('with acquire(), each read lands in the buffer it hands out; an entry larger than it gets its own', async () => {
  const src = new FakeSource();
  const ring = [0, 1, 2].map(() => Buffer.alloc(1 << 20));
  let next = 0;
  let acquired = 0;
  const entries = [...plan(), { offset: 27 << 20, length: 2 << 20, hole: false, tag: 1 }];
  const where: Array<Buffer | null> = [];
  const p = new DirectLoadPump(src, entries[Symbol.iterator](), (r) => {
    if (!r.data) return;
    let ok = r.data.length === r.length;
    for (let i = 0; i < r.length && ok; i += 4093) ok = r.data[i] === (r.offset + i) % 251;
    assert.ok(ok, `bytes of the read at ${r.offset}`);
    where.push(ring.find((b) => b.buffer === r.data?.buffer && b.byteOffset === r.data.byteOffset) ?? null);
  }, {
    readSize: 1 << 20,
    acquire: () => {
      acquired++;
      return ring[next++ % 3];
    },
  });
  await p.run();
  assert.is(acquired, 12, 'one buffer per data read, none for the hole');
  assert.equal(where.slice(0, 11), Array.from({ length: 11 }, (_, i) => ring[i % 3]), 'ring buffers in turn');
  assert.is(where[11], null, 'the 2 MiB entry got a buffer of its own');
});

const PS = 4096;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-direct-pump-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

// 3 MiB of pc.ram (3 chunks, several reads), every 7th page zero, a hole after 2.5 MiB.
const BLOCKS: SyntheticBlock[] = [{ id: 'pc.ram', length: 768 * PS }];
const r = prng(17);
const ram = Buffer.alloc(768 * PS);
for (let i = 0; i < 640 * PS; i++) ram[i] = (r() * 256) | 0;
for (let p = 3; p < 768; p += 7) ram.fill(0, p * PS, (p + 1) * PS);

function stream(): Buffer {
  const b = new StreamBuilder().header().configuration();
  b.sectionStart(2).memSize(BLOCKS).eos().footer(2);
  b.sectionPart(2);
  for (let p = 0; p < 768; p++) {
    const page = ram.subarray(p * PS, (p + 1) * PS);
    if (page.every((x) => x === 0)) b.zero(p * PS, p === 0 ? 'pc.ram' : null);
    else b.page(p * PS, p === 0 ? 'pc.ram' : null, page);
  }
  b.eos().footer(2);
  b.sectionEnd(2).eos().footer(2);
  b.device(3, 'timer', Buffer.from('DEVICE-STATE-MARK'));
  b.eof().vmdesc({ page_size: PS, devices: [{ name: 'timer', instance_id: 0, version: 1 }] });
  return b.build();
}

test('load with the CRC worker writes the same stream as inline CRCs; a damaged page stops it before the device state', async () => {
  const image = path.join(dir, 'ram.qcow2');
  await saveSnapshot(Readable.from([stream()]), image, { clusterSize: 64 << 10 });
  const inline = path.join(dir, 'inline.stream');
  const worker = path.join(dir, 'worker.stream');
  await loadSnapshot(image, { output: inline, crcWorker: false });
  const res = await loadSnapshot(image, { output: worker, crcWorker: true, readSize: 256 << 10 });
  const a = fs.readFileSync(inline);
  assert.ok(a.includes('DEVICE-STATE-MARK'), 'the device state went out');
  assert.ok(fs.readFileSync(worker).equals(a), 'same bytes either way');
  assert.is(res.streamBytes, a.length);

  // One byte of a data page in the middle of chunk 1 changes in the image.
  const bytes = fs.readFileSync(image);
  const page = 300;
  const at = bytes.indexOf(ram.subarray(page * PS, page * PS + 64));
  assert.ok(at > 0 && bytes.indexOf(ram.subarray(page * PS, page * PS + 64), at + 1) < 0, 'the page is found once');
  bytes[at + 100] ^= 0x40;
  const damaged = path.join(dir, 'damaged.qcow2');
  fs.writeFileSync(damaged, bytes);
  for (const crcWorker of [true, false]) {
    const out = path.join(dir, `damaged-${crcWorker}.stream`);
    try {
      await loadSnapshot(damaged, { output: out, crcWorker, readSize: 256 << 10 });
      assert.unreachable('a damaged page must stop the load');
    } catch (err) {
      assert.ok(err instanceof DigestMismatchError, String(err));
      assert.match((err as Error).message, /RAM digest mismatch .*\(chunk 1\)/);
    }
    assert.not.ok(fs.readFileSync(out).includes('DEVICE-STATE-MARK'), `no device state after a mismatch (worker ${crcWorker})`);
  }
});

test.run();
