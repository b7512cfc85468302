import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'fs';
import { Qcow2Image, Qcow2Error } from '../../src/image';
import { mustRun, rejectsWith, tempDir } from './qcow2-helpers';

const tmp = tempDir('refuse');
test.after(() => tmp.cleanup());

// A valid 64 KiB-cluster image from qemu-img, with some data: the base every crafted header mutates.
const basePath = tmp.file('base.qcow2');
mustRun('qemu-img', ['create', '-f', 'qcow2', basePath, '8M']);
mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 64k', basePath]);
const base = readFileSync(basePath);

let n = 0;
function crafted(mutate: (b: Buffer) => Buffer | void): string {
  const b = Buffer.from(base);
  const out = mutate(b) ?? b;
  const path = tmp.file(`crafted-${n++}.qcow2`);
  writeFileSync(path, out);
  return path;
}

test('the unmodified base opens and reads', async () => {
  const img = await Qcow2Image.open(crafted(() => undefined));
  assert.ok((await img.read(0, 65536)).equals(Buffer.alloc(65536, 0x42)));
  await img.close();
});

const cases: Array<[string, (b: Buffer) => Buffer | void, RegExp]> = [
  ['bad magic', (b) => void b.write('QFI\x00', 0, 'latin1'), /not a qcow2 image: bad magic/],
  ['empty file', () => Buffer.alloc(0), /bad magic/],
  ['raw data', () => Buffer.alloc(4096, 0x41), /bad magic \(0x41414141/],
  ['version 2', (b) => void b.writeUInt32BE(2, 4), /version 2 images are not supported/],
  ['version 4', (b) => void b.writeUInt32BE(4, 4), /unsupported qcow2 version 4/],
  ['file too short for a v3 header', (b) => b.subarray(0, 80), /too short for a qcow2 version 3 header: 80 bytes/],
  ['file too short for the magic+version', (b) => b.subarray(0, 6), /too short/],
  ['header_length beyond the file', (b) => {
    b.writeUInt32BE(4096, 100);
    return b.subarray(0, 1024);
  }, /too short for its header/],
  ['header_length not a multiple of 8', (b) => void b.writeUInt32BE(108, 100), /invalid header_length 108/],
  ['cluster_bits 8', (b) => void b.writeUInt32BE(8, 20), /cluster size out of range: cluster_bits 8/],
  ['cluster_bits 22', (b) => void b.writeUInt32BE(22, 20), /cluster size out of range: cluster_bits 22/],
  ['backing file', (b) => {
    b.writeBigUInt64BE(512n, 8);
    b.writeUInt32BE(4, 16);
  }, /backing file/],
  ['AES encryption', (b) => void b.writeUInt32BE(1, 32), /encrypted \(AES\)/],
  ['LUKS encryption', (b) => void b.writeUInt32BE(2, 32), /encrypted \(LUKS\)/],
  ['dirty bit', (b) => void (b[79] |= 1), /dirty.*needs qemu-img check -r/],
  ['corrupt bit', (b) => void (b[79] |= 2), /marked corrupt/],
  ['external data file bit', (b) => void (b[79] |= 4), /external data file/],
  ['compression type bit with zstd', (b) => {
    b[79] |= 8;
    b[104] = 1;
  }, /compression zstd is not supported/],
  ['compression type field without the bit', (b) => void (b[104] = 1), /compression zstd/],
  ['extended L2 entries', (b) => void (b[79] |= 16), /extended L2 entries/],
  ['unknown incompatible bit 5', (b) => void (b[79] |= 32), /unknown incompatible feature bits set: 0x0_00000020/],
  ['unknown incompatible bit 40', (b) => void (b[75] |= 1), /unknown incompatible feature bits/],
  ['refcount_order 7', (b) => void b.writeUInt32BE(7, 96), /refcount_order 7/],
  ['L1 table offset unaligned', (b) => void b.writeBigUInt64BE(b.readBigUInt64BE(40) + 512n, 40), /L1 table offset 0x[0-9a-f]+ is not cluster aligned/],
  ['L1 table outside the file', (b) => void b.writeBigUInt64BE(1n << 40n, 40), /L1 table .* lies outside the file/],
  ['L1 table too small for the virtual size', (b) => void b.writeBigUInt64BE(1n << 40n, 24), /L1 table too small/],
  ['refcount table unaligned', (b) => void b.writeBigUInt64BE(b.readBigUInt64BE(48) + 8n, 48), /refcount table offset .* not cluster aligned/],
  ['refcount table outside the file', (b) => void b.writeBigUInt64BE(1n << 40n, 48), /refcount table offset .* lies outside the file/],
  ['refcount table with zero clusters', (b) => void b.writeUInt32BE(0, 56), /refcount table has zero clusters/],
  ['L2 table outside the file', (b) => {
    const l1 = Number(b.readBigUInt64BE(40));
    b.writeBigUInt64BE((1n << 63n) | (1n << 40n), l1);
  }, /L1 entry 0: L2 table at 0x10000000000 lies outside the file/],
  ['L2 table unaligned', (b) => {
    const l1 = Number(b.readBigUInt64BE(40));
    b.writeBigUInt64BE(b.readBigUInt64BE(l1) + 512n, l1);
  }, /L1 entry 0: L2 table offset .* not cluster aligned/],
];

test('refcount block outside the file: refused by a writable open and by allocatedBytes(); a read-only open reads no refcounts', async () => {
  const path = crafted((b) => {
    const rt = Number(b.readBigUInt64BE(48));
    b.writeBigUInt64BE(1n << 40n, rt);
  });
  const err = await rejectsWith(Qcow2Image.open(path, { writable: true }), /refcount block 0 .* lies outside the file/);
  assert.instance(err, Qcow2Error);
  const ro = await Qcow2Image.open(path);
  try {
    assert.throws(() => ro.allocatedBytes(), /refcount block 0 .* lies outside the file/);
  } finally {
    await ro.close();
  }
});

for (const [name, mutate, pattern] of cases) {
  test(`refuses: ${name}`, async () => {
    const path = crafted(mutate);
    const err = await rejectsWith(Qcow2Image.open(path), pattern);
    assert.instance(err, Qcow2Error);
    assert.is((err as Qcow2Error).path, path);
    assert.ok(err.message.startsWith(path + ': '), err.message);
  });
}

test('an unaligned data cluster in an L2 table is an error on read, naming the entry', async () => {
  const path = crafted((b) => {
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    b.writeBigUInt64BE(b.readBigUInt64BE(l2) + 512n, l2);
  });
  const img = await Qcow2Image.open(path);
  const err = await rejectsWith(img.read(0, 10), /L2 entry 0 of table 0: data cluster offset .* not cluster aligned/);
  assert.type((err as Qcow2Error).offset, 'number');
  await img.close();
});

test('images made by QEMU with unsupported features are refused', async () => {
  const made = (name: string, opts: string[]): string => {
    const p = tmp.file(name);
    mustRun('qemu-img', ['create', '-f', 'qcow2', ...opts, p, '1M']);
    return p;
  };
  await rejectsWith(Qcow2Image.open(made('v2.qcow2', ['-o', 'compat=0.10'])), /version 2/);
  await rejectsWith(Qcow2Image.open(made('zstd.qcow2', ['-o', 'compression_type=zstd'])), /compression zstd/);
  await rejectsWith(Qcow2Image.open(made('extl2.qcow2', ['-o', 'extended_l2=on'])), /extended L2/);
  await rejectsWith(Qcow2Image.open(made('datafile.qcow2', ['-o', `data_file=${tmp.file('data.raw')}`])), /external data file/);
  await rejectsWith(Qcow2Image.open(made('backed.qcow2', ['-b', basePath, '-F', 'qcow2'])), /backing file/);
});

test('an image with internal snapshots opens read-only but not writable', async () => {
  const path = tmp.file('snap.qcow2');
  mustRun('qemu-img', ['create', '-f', 'qcow2', path, '1M']);
  mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 4k', path]);
  mustRun('qemu-img', ['snapshot', '-c', 's1', path]);
  const ro = await Qcow2Image.open(path);
  assert.ok((await ro.read(0, 4096)).equals(Buffer.alloc(4096, 0x33)));
  await ro.close();
  await rejectsWith(Qcow2Image.open(path, { writable: true }), /1 internal snapshot\(s\); writing to it is not supported/);
});

test('a missing file is a plain fs error, not a crash', async () => {
  try {
    await Qcow2Image.open(tmp.file('nope.qcow2'));
    assert.unreachable();
  } catch (err) {
    assert.is((err as NodeJS.ErrnoException).code, 'ENOENT');
  }
});

test.run();
