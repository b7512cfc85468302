import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { writeFileSync } from 'fs';
import { Qcow2Image } from '../../src/image';
import { mustRun, prng, qemuCheck, qemuMap, randInt, readRegion, tempDir, toRaw } from './qcow2-helpers';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = tempDir('read');
test.after(() => tmp.cleanup());

function assertClean(path: string): void {
  const c = qemuCheck(path);
  assert.is(c.status, 0, `qemu-img check ${path} failed:\n${c.text}`);
  assert.ok(c.text.includes('No errors were found'), c.text);
  assert.not.match(c.text, /leak/i);
}

function qemuIo(path: string, cmds: string[]): void {
  mustRun('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), path]);
}

/** Our reads of the whole disk, in odd-sized pieces that straddle clusters, vs QEMU's raw conversion. */
async function assertReadsLikeQemu(path: string, size: number, tag: string): Promise<Buffer> {
  const expected = readRegion(toRaw(path, tmp.file(`${tag}.raw`)), 0, size);
  const img = await Qcow2Image.open(path);
  assert.ok((await img.read(0, size)).equals(expected), `${tag}: whole-disk read`);
  const rand = prng(size);
  for (let i = 0; i < 40; i++) {
    const off = randInt(rand, size - 1);
    const len = 1 + randInt(rand, Math.min(size - off, 300 * KiB));
    assert.ok((await img.read(off, len)).equals(expected.subarray(off, off + len)), `${tag}: read ${len} at ${off}`);
  }
  assert.equal(img.allocatedRanges(0, size), qemuMap(path), `${tag}: allocation map`);
  await img.close();
  return expected;
}

/** 8 MiB mixing random data, compressible text, zeros and holes. */
function mixedRaw(path: string): Buffer {
  const rand = prng(99);
  const buf = Buffer.alloc(8 * MiB);
  rand(MiB).copy(buf, 0);
  buf.fill('qemu-snap compressible line of text\n', MiB, 3 * MiB);
  rand(100 * KiB).copy(buf, 3 * MiB + 12345);
  buf.fill(0x5a, 5 * MiB, 5 * MiB + 64 * KiB);
  rand(MiB + 7).copy(buf, 6 * MiB);
  writeFileSync(path, buf);
  return buf;
}

test('image made by qemu-img/qemu-io (data, zero flag, zero-alloc, partial clusters) reads byte for byte', async () => {
  const path = tmp.file('qemu.qcow2');
  mustRun('qemu-img', ['create', '-f', 'qcow2', path, '4M']);
  qemuIo(path, [
    'write -P 0xab 0 64k',
    'write -z 1M 64k', // zero flag, no host cluster
    'write -P 0xcd 2M 128k',
    'write -z 2M 64k', // zero flag on an allocated cluster (keeps its host cluster)
    'write -P 0x11 100k 10k', // part of a cluster
    'write -P 0x22 3M 1',
  ]);
  assertClean(path);
  const expected = await assertReadsLikeQemu(path, 4 * MiB, 'qemu');
  assert.is(expected[0], 0xab);
  assert.is(expected[2 * MiB], 0);
  assert.is(expected[2 * MiB + 64 * KiB], 0xcd);
});

test('random data written by qemu-img convert, 512-byte and 2 MiB clusters', async () => {
  const raw = tmp.file('mixed-src.raw');
  const model = mixedRaw(raw);
  for (const cs of ['512', '2M']) {
    const path = tmp.file(`conv-${cs}.qcow2`);
    mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, path]);
    const got = await assertReadsLikeQemu(path, model.length, `conv-${cs}`);
    assert.ok(got.equals(model));
  }
});

test('compressed image (qemu-img convert -c) reads byte for byte, 64K and 1M clusters', async () => {
  const raw = tmp.file('mixed-src2.raw');
  const model = mixedRaw(raw);
  for (const cs of ['64k', '1M']) {
    const path = tmp.file(`comp-${cs}.qcow2`);
    mustRun('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, path]);
    const got = await assertReadsLikeQemu(path, model.length, `comp-${cs}`);
    assert.ok(got.equals(model));
  }
});

test('writing into compressed, zero-flag and zero-alloc clusters copies on write; qemu-img check stays clean', async () => {
  const raw = tmp.file('mixed-src3.raw');
  const model = mixedRaw(raw);
  const path = tmp.file('cow.qcow2');
  mustRun('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', raw, path]);
  qemuIo(path, ['write -z 4M 64k', 'write -P 0x77 7M 64k', 'write -z 7M 64k']);
  model.fill(0, 7 * MiB, 7 * MiB + 64 * KiB);
  const before = await Qcow2Image.open(path);
  const usedBefore = before.allocatedBytes();
  await before.close();

  const img = await Qcow2Image.open(path, { writable: true });
  const rand = prng(4);
  const put = async (off: number, len: number): Promise<void> => {
    const d = rand(len);
    d.copy(model, off);
    await img.write(off, d);
  };
  await Promise.all([
    put(MiB + 100, 1000), // partial, compressed text cluster
    put(64 * KiB * 3 + 5, 64 * KiB), // straddles two compressed random clusters
    put(2 * MiB, 64 * KiB), // whole compressed cluster replaced
    put(4 * MiB + 10, 10), // zero-flag cluster
    put(7 * MiB + 64 * KiB - 1, 2), // zero-alloc cluster and the hole after it
  ]);
  // Again into a cluster that was just copied, and a read in between.
  assert.ok((await img.read(MiB, 2 * KiB)).equals(model.subarray(MiB, MiB + 2 * KiB)));
  await put(MiB + 50, 100);
  assert.ok((await img.read(0, model.length)).equals(model), 'our view before close');
  await img.close();

  assertClean(path);
  const got = await assertReadsLikeQemu(path, model.length, 'cow');
  assert.ok(got.equals(model), 'QEMU sees the copied-on-write data');
  const after = await Qcow2Image.open(path);
  assert.ok(after.allocatedBytes() > usedBefore);
  await after.close();
});

test('512-byte clusters, 64-bit refcounts: refcount table grows and the L1 table moves for VM state', async () => {
  const path = tmp.file('tiny.qcow2');
  // 64 refcounts per block and 64 blocks in the one-cluster table: 2 MiB of host space, then it must grow.
  mustRun('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', path, '2M']);
  const headerBefore = readRegion(path, 0, 104);
  const img = await Qcow2Image.open(path, { writable: true });
  const model = Buffer.alloc(2 * MiB);
  const data = prng(8)(2 * MiB - 1000);
  data.copy(model, 1000);
  await img.write(1000, data);
  // l1_size is 64 (one cluster): the VM state needs index 64 and up, a bigger L1 elsewhere.
  assert.is(img.vmStateOffset, 2 * MiB);
  const vm = prng(9)(300 * KiB);
  await img.writeVmState(17, vm);
  await img.close();
  assertClean(path);
  const headerAfter = readRegion(path, 0, 104);
  assert.is(headerBefore.readUInt32BE(56), 1, 'QEMU made a one-cluster refcount table');
  assert.ok(headerAfter.readUInt32BE(56) > 1, 'the refcount table grew');
  assert.is.not(headerAfter.readBigUInt64BE(48), headerBefore.readBigUInt64BE(48), 'and moved');
  assert.is(headerAfter.readUInt32BE(36), 64 + Math.ceil((17 + vm.length) / (512 * 64)), 'l1_size covers the VM state');
  assert.is.not(headerAfter.readBigUInt64BE(40), headerBefore.readBigUInt64BE(40), 'the L1 table moved');
  const got = await assertReadsLikeQemu(path, 2 * MiB, 'tiny');
  assert.ok(got.equals(model));
  const re = await Qcow2Image.open(path);
  assert.ok((await re.readVmState(17, vm.length)).equals(vm));
  assert.ok((await re.readVmState(0, 17)).equals(Buffer.alloc(17)));
  await re.close();
});

test('lazy L2 loading and eviction: 40 tables of 2 MiB (more than the 64 MiB cache) on a 20 TiB disk', async () => {
  const path = tmp.file('lazy.qcow2');
  const span = 512 * 1024 * MiB; // one 2 MiB L2 table maps 512 GiB
  mustRun('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=2M', path, '20T']);
  const cmds: string[] = [];
  for (let i = 0; i < 40; i++) cmds.push(`write -P ${0x10 + i} ${i * span + 3 * MiB} 4k`);
  qemuIo(path, cmds);
  const img = await Qcow2Image.open(path, { writable: true });
  // Not preloaded: the map of table 39 is not in memory yet.
  assert.throws(() => img.allocatedRanges(39 * span, MiB), /not in memory; await loadMetadata/);
  for (const i of [0, 39, 5, 20, 39, 0]) {
    const got = await img.read(i * span + 3 * MiB, 4096);
    assert.ok(got.equals(Buffer.alloc(4096, 0x10 + i)), `table ${i}`);
  }
  // Concurrent reads and writes over all tables, more than the cache holds.
  const ops: Array<Promise<unknown>> = [];
  for (let i = 0; i < 40; i++) {
    ops.push(img.read(i * span + 3 * MiB, 4096).then((b) => assert.is(b[0], 0x10 + i)));
    ops.push(img.write(i * span + 3 * MiB + 100, Buffer.alloc(10, 0xe0 + (i % 16))));
  }
  await Promise.all(ops);
  await img.loadMetadata(7 * span, span);
  assert.equal(img.allocatedRanges(7 * span, 8 * MiB), [
    { offset: 7 * span, length: 2 * MiB, allocated: false },
    { offset: 7 * span + 2 * MiB, length: 2 * MiB, allocated: true },
    { offset: 7 * span + 4 * MiB, length: 4 * MiB, allocated: false },
  ]);
  await img.close();
  assertClean(path);
  for (const i of [0, 17, 39]) {
    mustRun('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -P ${0x10 + i} ${i * span + 3 * MiB} 100`, '-c', `read -P ${0xe0 + (i % 16)} ${i * span + 3 * MiB + 100} 10`, path]);
  }
});

test.run();
