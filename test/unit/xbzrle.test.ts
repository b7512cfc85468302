// XBZRLE: the decoder against hand-built deltas (QEMU's xbzrle_decode_buffer
// rules), the framer's record checks, and save applying deltas to the page
// as last written, whether it is still in the open run, in flight, or on disk.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { applyXbzrle, encodeXbzrle, XbzrleDecodeError } from '../../src/migration/xbzrle';
import { saveSnapshot } from '../../src/snapshot/save';
import { openSnapshot } from '../../src/snapshot/snapshot-image';
import { StreamFormatError } from '../../src/migration/errors';
import { StreamBuilder, BLOCKS, frame, prng } from './synthetic-stream';

const PS = 4096;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-xbzrle-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function decode(base: Buffer, delta: number[]): Buffer {
  const page = Buffer.from(base);
  const d = Buffer.from(delta);
  applyXbzrle(page, d, 0, d.length);
  return page;
}

function decodeError(delta: number[], size = PS): XbzrleDecodeError {
  try {
    decode(Buffer.alloc(size), delta);
  } catch (err) {
    assert.instance(err, XbzrleDecodeError);
    return err as XbzrleDecodeError;
  }
  return assert.unreachable('expected a decode error') as never;
}

test('decoder: hand-built deltas patch the old page', () => {
  const base = Buffer.alloc(PS, 0x11);
  // zrun 4, nzrun 2 [aa bb]
  const a = decode(base, [4, 2, 0xaa, 0xbb]);
  assert.equal([...a.subarray(0, 7)], [0x11, 0x11, 0x11, 0x11, 0xaa, 0xbb, 0x11]);
  // First zrun may be 0; a two-byte uleb128: 200 = 0xc8 0x01.
  const b = decode(base, [0, 1, 0x01, 0xc8, 0x01, 1, 0x02]);
  assert.is(b[0], 0x01);
  assert.is(b[201], 0x02);
  assert.is(b[200], 0x11);
  assert.is(b[202], 0x11);
  // A change in the last byte of the page.
  const c = decode(base, [0xff, 0x1f, 1, 0x77]);
  assert.is(c[PS - 1], 0x77);
  assert.is(c[PS - 2], 0x11);
  // An empty delta changes nothing.
  assert.ok(decode(base, []).equals(base));
});

test('decoder: truncated runs, overlong runs, lengths beyond the page', () => {
  assert.match(decodeError([5]).message, /truncated run/);
  assert.is(decodeError([5]).deltaOffset, 0);
  // A zero run with no non-zero run after it.
  assert.match(decodeError([4, 1, 0xaa, 3]).message, /truncated run/);
  // A non-zero run longer than what is left.
  const short = decodeError([0, 5, 1, 2]);
  assert.match(short.message, /non-zero run of 5 bytes is longer than the 2 bytes left/);
  assert.is(short.deltaOffset, 1);
  // uleb128 beyond 14 bits (QEMU's small form has at most two bytes).
  assert.match(decodeError([0x80, 0x80, 0x01, 1, 0]).message, /longer than 14 bits/);
  assert.match(decodeError([0, 0x80, 0x80, 0x01]).message, /longer than 14 bits/);
  // Runs past the end of the page.
  assert.match(decodeError([0x80, 0x21, 1, 0]).message, /zero run of 4224 bytes goes past the end of the 4096-byte page/);
  assert.match(decodeError([0xff, 0x1f, 2, 1, 2]).message, /non-zero run of 2 bytes goes past the end/);
  // Empty runs.
  assert.match(decodeError([0, 0, 1]).message, /empty non-zero run/);
  assert.match(decodeError([0, 1, 9, 0, 1, 9]).message, /empty zero run/);
});

/** Integers in [0, 2^32) from the shared float PRNG. */
function intPrng(seed: number): () => number {
  const f = prng(seed);
  return () => Math.floor(f() * 4294967296);
}

test('decoder: random deltas round-trip', () => {
  const rnd = intPrng(7);
  let decoded = 0;
  for (let n = 0; n < 200; n++) {
    const old = Buffer.alloc(PS);
    for (let i = 0; i < PS; i++) old[i] = rnd() & 0xff;
    const neu = Buffer.from(old);
    const changes = 1 + (rnd() % 40);
    for (let k = 0; k < changes; k++) {
      const at = rnd() % PS;
      const len = 1 + (rnd() % 200);
      for (let i = at; i < Math.min(PS, at + len); i++) neu[i] = rnd() & 0xff;
    }
    const delta = encodeXbzrle(old, neu);
    if (delta === null) continue;
    const out = Buffer.from(old);
    applyXbzrle(out, delta, 0, delta.length);
    assert.ok(out.equals(neu), `round trip ${n}`);
    decoded++;
  }
  assert.ok(decoded > 100, `most deltas fit a page (${decoded})`);
});

function be64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(Math.floor(n / 2 ** 32), 0);
  b.writeUInt32BE(n % 2 ** 32, 4);
  return b;
}

/** An XBZRLE record: header (with idstr unless null), encoding flag, be16 length, delta. */
function xbzrle(b: StreamBuilder, address: number, block: string | null, delta: Buffer, opts: { flag?: number; len?: number } = {}): StreamBuilder {
  const flags = 0x40 | (block === null ? 0x20 : 0);
  const id = block === null ? Buffer.alloc(0) : Buffer.concat([Buffer.from([block.length]), Buffer.from(block, 'latin1')]);
  const len = Buffer.alloc(2);
  len.writeUInt16BE(opts.len ?? delta.length, 0);
  return b.raw(Buffer.concat([be64(address + flags), id, Buffer.from([opts.flag ?? 1]), len, delta]));
}

function page(fill: number): Buffer {
  return Buffer.alloc(PS, fill);
}

test('framer: wrong encoding flag and a length beyond the page are errors with their offset', async () => {
  const start = () => new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(2).page(0, 'pc.ram');
  const b1 = start();
  const at1 = b1.length;
  try {
    await frame(xbzrle(b1, 0, null, Buffer.from([0, 1, 5]), { flag: 2 }).eos().build());
    assert.unreachable();
  } catch (err) {
    assert.instance(err, StreamFormatError);
    assert.match((err as Error).message, /encoding flag 0x02/);
    assert.is((err as StreamFormatError).offset, at1 + 8);
  }
  const b2 = start();
  try {
    await frame(xbzrle(b2, 0, null, Buffer.alloc(0), { len: PS + 1 }).build());
    assert.unreachable();
  } catch (err) {
    assert.match((err as Error).message, /XBZRLE delta of 4097 bytes is longer than a page/);
  }
  // Accepted, with CONTINUE and with a block name, in any chunking.
  const ok = xbzrle(xbzrle(start(), 0, null, Buffer.from([0, 1, 5])), 0, '/rom@etc/acpi/tables', Buffer.from([3, 1, 6])).eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 't', Buffer.alloc(2)).eof().build();
  const recs = await frame(ok, [3, 7, 1]);
  const xs = recs.filter((r) => r.type === 'ram-xbzrle');
  assert.is(xs.length, 2);
});

test('save: deltas apply to the page as last written (open run, written run, never sent), malformed ones fail with the stream offset', async () => {
  const b = new StreamBuilder().header().configuration();
  b.sectionStart(2).memSize(BLOCKS).eos().footer(2);
  // Pass 1: pages 0-3 of pc.ram and page 0 of the ROM (the ROM page ends the pc.ram run).
  b.sectionPart(2).page(0, 'pc.ram', page(1)).page(PS, null, page(2)).page(2 * PS, null, page(3)).page(3 * PS, null, page(4));
  // Page 2 is still in the open run.
  xbzrle(b, 2 * PS, null, Buffer.from([10, 2, 0xaa, 0xbb]));
  b.page(0, '/rom@etc/acpi/tables', page(9)).eos().footer(2);
  // Pass 2: page 0 was written (or is in flight); page 7 was never sent (zeros).
  b.sectionPart(2);
  xbzrle(b, 0, 'pc.ram', Buffer.from([0, 1, 0xcc]));
  xbzrle(b, 7 * PS, null, Buffer.from([100, 1, 0xdd]));
  // Page 0 again: the delta must apply to the version just patched.
  xbzrle(b, 0, null, Buffer.from([1, 1, 0xee]));
  b.eos().footer(2);
  b.sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1, 2, 3])).eof();
  const image = path.join(dir, 'x.qcow2');
  const r = await saveSnapshot(Readable(b.build()), image, { clusterSize: 64 << 10 });
  assert.is(r.xbzrleRecords, 4);
  assert.is(r.dataPages, 6);
  const snap = await openSnapshot(image);
  try {
    const p0 = page(1);
    p0[0] = 0xcc;
    p0[1] = 0xee;
    assert.ok((await snap.image.read(0, PS)).equals(p0), 'page 0 patched twice, in order');
    const p2 = page(3);
    p2[10] = 0xaa;
    p2[11] = 0xbb;
    assert.ok((await snap.image.read(2 * PS, PS)).equals(p2), 'page 2 patched in the open run');
    const p7 = Buffer.alloc(PS);
    p7[100] = 0xdd;
    assert.ok((await snap.image.read(7 * PS, PS)).equals(p7), 'a page never sent patches zeros');
    assert.ok((await snap.image.read(3 * PS, PS)).equals(page(4)));
  } finally {
    await snap.image.close();
  }

  // A malformed delta: the error names the record's stream offset, and no image is left.
  const bad = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(2).page(0, 'pc.ram', page(1));
  const badAt = bad.length;
  xbzrle(bad, 0, null, Buffer.from([0, 9, 1, 2]));
  bad.eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1])).eof();
  const badImage = path.join(dir, 'bad.qcow2');
  try {
    await saveSnapshot(Readable(bad.build()), badImage);
    assert.unreachable('expected a failure');
  } catch (err) {
    assert.match((err as Error).message, new RegExp(`bad XBZRLE delta for page 0x0 of block "pc.ram": non-zero run of 9 bytes is longer than the 2 bytes left in the delta at byte 1 of the delta \\(at stream byte ${badAt}\\)`));
  }
  assert.not.ok(fs.existsSync(badImage));
  assert.equal(fs.readdirSync(dir).filter((f) => f.includes('bad')), []);
});

test('compressed pages (QEMU 7.2 compress): inflated into place; bad zlib data and lengths beyond the bound fail with the offset', async () => {
  const zlib = require('node:zlib') as typeof import('node:zlib');
  const compressed = (b: StreamBuilder, address: number, block: string | null, data: Buffer): StreamBuilder => {
    const flags = 0x100 | (block === null ? 0x20 : 0);
    const id = block === null ? Buffer.alloc(0) : Buffer.concat([Buffer.from([block.length]), Buffer.from(block, 'latin1')]);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length, 0);
    return b.raw(Buffer.concat([be64(address + flags), id, len, data]));
  };
  const rnd = intPrng(3);
  const p5 = Buffer.alloc(PS);
  for (let i = 0; i < PS; i += 7) p5[i] = rnd() & 0xff;
  const start = () => new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(2);
  const b = compressed(compressed(start(), 5 * PS, 'pc.ram', zlib.deflateSync(p5)), 6 * PS, null, zlib.deflateSync(page(0x42), { level: 1 }));
  b.eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1])).eof();
  const image = path.join(dir, 'z.qcow2');
  const r = await saveSnapshot(Readable(b.build(), 333), image);
  assert.is(r.compressedRecords, 2);
  assert.is(r.dataPages, 2);
  const snap = await openSnapshot(image);
  try {
    assert.ok((await snap.image.read(5 * PS, PS)).equals(p5));
    assert.ok((await snap.image.read(6 * PS, PS)).equals(page(0x42)));
  } finally {
    await snap.image.close();
  }
  for (const [data, re] of [
    [zlib.deflateSync(p5).subarray(0, 30), /zlib: unexpected end of file/],
    [zlib.deflateSync(Buffer.alloc(100, 1)), /inflates to 100 bytes, not a page/],
    [zlib.deflateSync(Buffer.alloc(2 * PS, 1)), /zlib: /],
  ] as const) {
    const bad = start();
    const at = bad.length;
    compressed(bad, 0, 'pc.ram', data).eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1])).eof();
    const out = path.join(dir, 'zbad.qcow2');
    try {
      await saveSnapshot(Readable(bad.build()), out);
      assert.unreachable(`saved with ${data.length} bytes of zlib data`);
    } catch (err) {
      assert.match((err as Error).message, re, (err as Error).message);
      assert.match((err as Error).message, new RegExp(`at stream byte ${at}\\)`));
    }
    assert.not.ok(fs.existsSync(out));
  }
  const long = start();
  const at = long.length;
  try {
    await frame(compressed(long, 0, 'pc.ram', Buffer.alloc(4111)).build());
    assert.unreachable();
  } catch (err) {
    assert.match((err as Error).message, new RegExp(`bad stream at byte ${at + 8 + 7}: compressed page of 4111 bytes is longer than zlib's bound for a page \\(4110\\)`));
  }
});

test('the writer reads a page back only once the write holding it has completed', async () => {
  const { SnapshotWriter } = require('../../src/snapshot/snapshot-writer') as typeof import('../../src/snapshot/snapshot-writer');
  const { MigrationFramer } = require('../../src/migration/framer') as typeof import('../../src/migration/framer');
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2);
  // Page 0, then a ROM page (the run with page 0 is pushed), then a delta for page 0.
  b.sectionPart(2).page(0, 'pc.ram', page(7)).page(0, '/rom@etc/acpi/tables', page(8));
  xbzrle(b, 0, 'pc.ram', Buffer.from([5, 1, 0x99]));
  b.eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1])).eof();
  const disk = Buffer.alloc(4 << 20);
  const held: Array<{ offset: number; length: number; buffers: Buffer[] }> = [];
  const reads: number[] = [];
  let completed = 0;
  const writer = new SnapshotWriter({
    prepareImage: async () => 3 << 20,
    readPage: (offset, out) => {
      reads.push(offset);
      // Reading before the write of that page completed would see zeros here.
      disk.copy(out, 0, offset, offset + out.length);
      return null;
    },
  });
  writer.on('data', (w: unknown) => held.push(w as { offset: number; length: number; buffers: Buffer[] }));
  const framer = new MigrationFramer({ pageRuns: true });
  framer.pipe(writer);
  const done = new Promise<void>((resolve, reject) => {
    writer.on('end', resolve);
    writer.on('error', reject);
    framer.on('error', reject);
  });
  framer.end(b.build());
  // Let everything up to the delta through; nothing has completed yet.
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  assert.equal(reads, [], 'no read while the write of page 0 is in flight');
  const page0 = held.findIndex((w) => w.offset === 0);
  assert.ok(page0 >= 0, 'the run holding page 0 was pushed');
  // Complete the writes in order: "disk" gets their bytes, the writer hears of each.
  const complete = (): void => {
    while (completed < held.length) {
      const w = held[completed++];
      let at = w.offset;
      for (const buf of w.buffers) {
        if (at + buf.length <= disk.length) buf.copy(disk, at);
        at += buf.length;
      }
      writer.writeDone(w);
    }
  };
  complete();
  for (let i = 0; i < 20; i++) {
    await new Promise((r) => setImmediate(r));
    complete();
  }
  await done;
  complete();
  assert.equal(reads, [0], 'read once, after the write completed');
  const want = page(7);
  want[5] = 0x99;
  assert.ok(disk.subarray(0, PS).equals(want), 'the delta applied to the completed page');
  assert.is(writer.summary().xbzrleRecords, 1);
});

function Readable(buf: Buffer, chunk = 999): NodeJS.ReadableStream {
  const parts: Buffer[] = [];
  for (let i = 0; i < buf.length; i += chunk) parts.push(buf.subarray(i, i + chunk));
  return require('node:stream').Readable.from(parts) as NodeJS.ReadableStream;
}

test.run();
