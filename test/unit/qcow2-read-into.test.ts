// readInto / readIntoSync: the same bytes as read(), placed at the caller's
// offset, nothing outside the range touched; readIntoSync declines what only
// the asynchronous path can do (compressed clusters, tables not in memory).
// viewSync: mapped views equal read() where it gives one, and it declines
// holes, compressed clusters and writable images.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { writeFileSync } from 'fs';
import { Qcow2Image, Qcow2Error } from '../../src/image';
import { mustRun, prng, randInt, tempDir } from './qcow2-helpers';
import { native } from '../../src/util/native';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = tempDir('read-into');
test.after(() => tmp.cleanup());

/** 4 MiB: random data, a hole, text, a partly written cluster. */
function model(): Buffer {
  const rand = prng(5);
  const buf = Buffer.alloc(4 * MiB);
  rand(MiB).copy(buf, 0);
  buf.fill('some text\n', 2 * MiB, 3 * MiB);
  rand(10 * KiB).copy(buf, 3 * MiB + 777);
  return buf;
}

function image(name: string, compress: boolean): string {
  const raw = tmp.file(`${name}.raw`);
  writeFileSync(raw, model());
  const path = tmp.file(`${name}.qcow2`);
  mustRun('qemu-img', ['convert', ...(compress ? ['-c'] : []), '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', raw, path]);
  return path;
}

test('readInto and readIntoSync place read() bytes at the offset and touch nothing else', async () => {
  const want = model();
  const img = await Qcow2Image.open(image('plain', false));
  try {
    const rand = prng(17);
    for (let i = 0; i < 30; i++) {
      const off = randInt(rand, want.length - 1);
      const len = randInt(rand, Math.min(want.length - off, 600 * KiB));
      const at = randInt(rand, 5000);
      for (const sync of [false, true]) {
        const out = Buffer.alloc(at + len + 100, 0xee);
        if (sync) assert.ok(img.readIntoSync(off, len, out, at), `sync read ${len} at ${off}`);
        else await img.readInto(off, len, out, at);
        assert.ok(out.subarray(at, at + len).equals(want.subarray(off, off + len)), `${sync ? 'sync' : 'async'} ${len} bytes at ${off}`);
        assert.ok(out.subarray(0, at).every((b) => b === 0xee), 'nothing before the range');
        assert.ok(out.subarray(at + len).every((b) => b === 0xee), 'nothing after the range');
      }
    }
    // A hole over stale bytes reads as zeros.
    const stale = Buffer.alloc(64 * KiB, 0xff);
    assert.ok(img.readIntoSync(MiB + 64 * KiB, 64 * KiB, stale));
    assert.ok(stale.every((b) => b === 0));
  } finally {
    await img.close();
  }
});

test('readIntoSync declines compressed clusters; readInto reads them', async () => {
  const want = model();
  const img = await Qcow2Image.open(image('comp', true));
  try {
    // The text compresses (random data would be stored as is).
    const out = Buffer.alloc(MiB);
    assert.is(img.readIntoSync(2 * MiB, MiB, out), false, 'compressed: not now');
    await img.readInto(2 * MiB, MiB, out);
    assert.ok(out.equals(want.subarray(2 * MiB, 3 * MiB)));
    assert.ok(img.readIntoSync(MiB, 64 * KiB, out), 'a hole needs no inflating');
  } finally {
    await img.close();
  }
});

test('readIntoSync declines ranges whose L2 table is not in memory', async () => {
  // 40 tables of 2 MiB: more than the 64 MiB cache, so open() preloads none.
  const path = tmp.file('lazy.qcow2');
  const span = 512 * 1024 * MiB; // one 2 MiB L2 table maps 512 GiB
  mustRun('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=2M', path, '20T']);
  mustRun('qemu-io', ['-f', 'qcow2', ...Array.from({ length: 40 }, (_, i) => ['-c', `write -P ${0x10 + i} ${i * span + 3 * MiB} 4k`]).flat(), path]);
  const img = await Qcow2Image.open(path);
  try {
    const far = 39 * span + 3 * MiB;
    const out = Buffer.alloc(4 * KiB);
    assert.is(img.readIntoSync(far, 4 * KiB, out), false, 'table not loaded');
    await img.loadMetadata(far, 4 * KiB);
    assert.ok(img.readIntoSync(far, 4 * KiB, out), 'after loadMetadata');
    assert.ok(out.every((b) => b === 0x10 + 39));
  } finally {
    await img.close();
  }
});

test('readInto and readIntoSync refuse a range that does not fit the buffer or the disk', async () => {
  const img = await Qcow2Image.open(image('fit', false));
  try {
    const out = Buffer.alloc(100);
    assert.throws(() => img.readIntoSync(0, 101, out), (e: Error) => e instanceof Qcow2Error && /does not fit a 100-byte buffer/.test(e.message));
    assert.throws(() => img.readInto(0, 50, out, 60), (e: Error) => e instanceof Qcow2Error && /at offset 60/.test(e.message));
    assert.throws(() => img.readIntoSync(4 * MiB - 10, 20, out), /outside the virtual disk/);
  } finally {
    await img.close();
  }
});

test('viewSync: views of contiguous data equal read(), across mapping windows; holes and text-only ranges are declined', async () => {
  assert.ok(native(), 'views need the native module');
  // 40 MiB of data (more than two 16 MiB windows), then a 1 MiB hole.
  const rand = prng(23);
  const want = Buffer.alloc(48 * MiB);
  rand(40 * MiB).copy(want, 0);
  const raw = tmp.file('view.raw');
  writeFileSync(raw, want);
  const file = tmp.file('view.qcow2');
  mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', raw, file]);
  const img = await Qcow2Image.open(file);
  try {
    const r = prng(29);
    let views = 0;
    for (let i = 0; i < 60; i++) {
      // Backwards and forwards: the window moves both ways.
      const len = 1 + randInt(r, 2 * MiB);
      const off = randInt(r, 40 * MiB - len);
      const v = img.viewSync(off, len);
      if (v === null) continue;
      views++;
      assert.is(v.length, len);
      assert.ok(v.equals(want.subarray(off, off + len)), `view of ${len} at ${off}`);
    }
    assert.ok(views > 50, `${views} of 60 ranges mapped (qemu-img writes data clusters in order)`);
    const across = img.viewSync(16 * MiB - 5000, 10_000);
    assert.ok(across && across.equals(want.subarray(16 * MiB - 5000, 16 * MiB + 5000)), 'a range across a window boundary');
    assert.is(img.viewSync(40 * MiB - 4096, 8192), null, 'data then a hole');
    assert.is(img.viewSync(41 * MiB, 4096), null, 'a hole');
    assert.throws(() => img.viewSync(48 * MiB - 10, 20), /outside the virtual disk/);
  } finally {
    await img.close();
  }
  const writable = await Qcow2Image.open(file, { writable: true });
  try {
    assert.is(writable.viewSync(0, 4096), null, 'a writable image is never mapped (it may grow under the view)');
  } finally {
    await writable.close();
  }
  const compressed = await Qcow2Image.open(image('view-comp', true));
  try {
    assert.is(compressed.viewSync(2 * MiB, 4096), null, 'compressed');
  } finally {
    await compressed.close();
  }
});

test.run();
