// DirectLoadPump: every plan entry reaches the encoder once, in order, with
// the right bytes (synchronous reads, the asynchronous fallback, holes as
// null) in one reused buffer; an abort or a failed read stops it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
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

test.run();
