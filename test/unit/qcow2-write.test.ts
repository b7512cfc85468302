import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Qcow2Image } from '../../src/image';
import { prng, qemuCheck, qemuInfo, qemuMap, randInt, readRegion, rejectsWith, run, tempDir, toRaw } from './qcow2-helpers';

const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 1024 * 1024 * MiB;
const tmp = tempDir('write');
test.after(() => tmp.cleanup());

function assertClean(path: string): number {
  const c = qemuCheck(path);
  assert.is(c.status, 0, `qemu-img check ${path} failed:\n${c.text}`);
  assert.ok(c.text.includes('No errors were found'), c.text);
  assert.not.match(c.text, /leak/i);
  return c.allocatedClusters;
}

interface Written {
  offset: number;
  data: Buffer;
}

/** A write plan that straddles clusters, hits both ends of the disk and overwrites itself. */
function planWrites(virtualSize: number, clusterSize: number, seed: number): Written[] {
  const rand = prng(seed);
  const w: Written[] = [];
  const add = (offset: number, length: number): void => {
    const len = Math.min(length, virtualSize - offset);
    if (offset >= 0 && len > 0) w.push({ offset, data: rand(len) });
  };
  add(0, 4096);
  add(clusterSize - 1000, 3000); // straddles the first cluster boundary
  add(virtualSize - 5000, 5000); // the very end
  add(Math.floor(virtualSize / 2 / 512) * 512 + 7, 2 * clusterSize + 13); // three clusters
  add(100, 50); // overwrite inside the first write
  add(clusterSize - 10, 20); // overwrite across the boundary again
  for (let i = 0; i < 6; i++) add(randInt(rand, virtualSize), 1 + randInt(rand, 3 * clusterSize));
  return w;
}

/** Regions to compare: everything written, plus probes between them (zeros unless written). */
function compareWithModel(raw: string, virtualSize: number, writes: Written[]): void {
  if (virtualSize <= 64 * MiB) {
    const model = Buffer.alloc(virtualSize);
    for (const { offset, data } of writes) data.copy(model, offset);
    assert.ok(readRegion(raw, 0, virtualSize).equals(model), 'whole raw image differs from the model');
    return;
  }
  // Sparse huge disk: check each written region (latest data wins) and a margin around it.
  for (const { offset, data } of writes) {
    const from = Math.max(0, offset - 4096);
    const to = Math.min(virtualSize, offset + data.length + 4096);
    const model = Buffer.alloc(to - from);
    for (const w of writes) {
      const a = Math.max(from, w.offset);
      const b = Math.min(to, w.offset + w.data.length);
      if (a < b) w.data.copy(model, a - from, a - w.offset, b - w.offset);
    }
    assert.ok(readRegion(raw, from, to - from).equals(model), `region ${from}..${to} differs`);
  }
}

for (const clusterSize of [64 * KiB, 512 * KiB, MiB, 2 * MiB]) {
  for (const virtualSize of [MiB, 48 * MiB + 512, TiB]) {
    test(`written image passes qemu-img check and reads back in QEMU: cluster ${clusterSize / KiB}K, size ${virtualSize}`, async () => {
      const path = tmp.file(`m-${clusterSize}-${virtualSize}.qcow2`);
      const img = await Qcow2Image.create(path, { virtualSize, clusterSize });
      const writes = planWrites(virtualSize, clusterSize, clusterSize ^ virtualSize);
      for (const { offset, data } of writes) await img.write(offset, data);
      const vmstate = prng(7)(2 * clusterSize + 333);
      await img.writeVmState(0, vmstate);
      await img.writeVmState(clusterSize - 3, Buffer.from('STVMSTVM')); // across a VM state cluster boundary
      vmstate.write('STVMSTVM', clusterSize - 3, 'latin1');
      await img.close();

      const allocated = assertClean(path);
      const info = qemuInfo(path);
      assert.is(info['virtual-size'], virtualSize);
      assert.is(info['cluster-size'], clusterSize);

      // check counts every guest cluster we mapped, VM state included.
      const re = await Qcow2Image.open(path);
      const diskClusters = re
        .allocatedRanges(0, virtualSize)
        .filter((r) => r.allocated)
        .reduce((n, r) => n + Math.ceil((r.offset + r.length) / clusterSize) - Math.floor(r.offset / clusterSize), 0);
      assert.is(allocated, diskClusters + 3, 'qemu-img check allocated-clusters = disk clusters + 3 VM state clusters');
      assert.equal(re.allocatedRanges(0, virtualSize), qemuMap(path), 'allocation map agrees with qemu-img map');
      assert.ok((await re.readVmState(0, vmstate.length)).equals(vmstate), 'VM state round-trips');
      assert.ok((await re.readVmState(vmstate.length, 100)).equals(Buffer.alloc(100)), 'unwritten VM state reads as zeros');
      for (const { offset, data } of writes.slice(-3)) {
        const got = await re.read(offset, data.length);
        const model = Buffer.alloc(data.length);
        for (const w of writes) {
          const a = Math.max(offset, w.offset);
          const b = Math.min(offset + data.length, w.offset + w.data.length);
          if (a < b) w.data.copy(model, a - offset, a - w.offset, b - w.offset);
        }
        assert.ok(got.equals(model), `our read at ${offset} matches`);
      }
      await re.close();

      const raw = toRaw(path, tmp.file(`m-${clusterSize}-${virtualSize}.raw`));
      compareWithModel(raw, virtualSize, writes);
      run('rm', ['-f', raw, path]);
    });
  }
}

test('VM state is invisible to the guest but counted by qemu-img check', async () => {
  const path = tmp.file('vmstate.qcow2');
  const img = await Qcow2Image.create(path, { virtualSize: 4 * MiB, clusterSize: 64 * KiB });
  assert.is(img.vmStateOffset, 512 * MiB, 'l1_vm_state_index (1) * cluster_size * cluster_size/8');
  const state = prng(3)(300 * KiB);
  await img.writeVmState(0, state);
  await img.close();
  assert.is(assertClean(path), 5, '300 KiB of VM state = 5 clusters of 64 KiB');
  // The whole guest disk still reads as zeros through QEMU.
  const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -P 0 0 ${4 * MiB}`, path]);
  assert.is(r.status, 0, r.stderr);
  assert.not.match(r.stdout, /Pattern verification failed/);
  assert.equal(qemuMap(path), [{ offset: 0, length: 4 * MiB, allocated: false }]);
  const re = await Qcow2Image.open(path);
  assert.ok((await re.readVmState(0, state.length)).equals(state));
  assert.is(re.allocatedBytes(), (3 + 1 + 1 + 5) * 64 * KiB, 'header, reftable, refblock, L1, L2 + 5 data clusters');
  await re.close();
});

test('deferFlush: create() writes nothing; the first flush writes an image identical in content, qemu-img check clean', async () => {
  const path = tmp.file('deferred.qcow2');
  const img = await Qcow2Image.create(path, { virtualSize: 4 * MiB, clusterSize: 64 * KiB, deferFlush: true });
  assert.is((await import('node:fs')).statSync(path).size, 0, 'nothing written by create');
  const data = prng(9)(200 * KiB);
  await img.writev(MiB + 4 * KiB, [data]);
  const state = prng(10)(70 * KiB);
  await img.writeVmState(0, state);
  await img.close();
  assertClean(path);
  const re = await Qcow2Image.open(path);
  assert.ok((await re.read(MiB + 4 * KiB, data.length)).equals(data));
  assert.ok((await re.read(0, MiB)).equals(Buffer.alloc(MiB)), 'unwritten space reads as zeros');
  assert.ok((await re.readVmState(0, state.length)).equals(state));
  await re.close();
});

test('concurrent writes to different clusters, then to one cluster in sequence', async () => {
  const path = tmp.file('concurrent.qcow2');
  const cs = 64 * KiB;
  const size = 16 * MiB;
  const img = await Qcow2Image.create(path, { virtualSize: size, clusterSize: cs });
  const rand = prng(11);
  const model = Buffer.alloc(size);
  const writes: Array<Promise<void>> = [];
  for (let i = 0; i < 128; i++) {
    // Cluster i*2 gets a piece, so no two writes touch the same cluster.
    const off = i * 2 * cs + randInt(rand, cs / 2);
    const data = rand(1 + randInt(rand, cs / 2));
    data.copy(model, off);
    writes.push(img.write(off, data));
  }
  // Several writes into the same fresh cluster at disjoint bytes, all at once.
  for (let k = 0; k < 8; k++) {
    const off = 3 * cs + k * 1000;
    const data = rand(900);
    data.copy(model, off);
    writes.push(img.write(off, data));
  }
  await Promise.all(writes);
  for (let k = 0; k < 10; k++) {
    const off = 5 * cs + 1000 + k * 7;
    const data = rand(2000);
    data.copy(model, off);
    await img.write(off, data);
  }
  assert.ok((await img.read(0, size)).equals(model), 'read before close');
  await img.close();
  assertClean(path);
  assert.ok(readRegion(toRaw(path, tmp.file('concurrent.raw')), 0, size).equals(model), 'QEMU sees the same bytes');
});

test('writev: one guest range from many buffers, across clusters', async () => {
  const path = tmp.file('writev.qcow2');
  const cs = 64 * KiB;
  const img = await Qcow2Image.create(path, { virtualSize: 2 * MiB, clusterSize: cs });
  const rand = prng(5);
  const parts = [rand(4096), rand(0), rand(cs - 4096 + 10), rand(3), rand(2 * cs), rand(777)];
  const all = Buffer.concat(parts);
  const at = cs - 5;
  await img.writev(at, parts);
  assert.ok((await img.read(at, all.length)).equals(all));
  await img.close();
  assertClean(path);
  assert.ok(readRegion(toRaw(path, tmp.file('writev.raw')), at, all.length).equals(all));
});

test('writeSegmentsSync: the same image as write() for the same plan, and it declines what needs copy-on-write', async () => {
  const cs = 64 * KiB;
  const virtualSize = 48 * MiB + 512;
  const writes = planWrites(virtualSize, cs, 99);
  const viaSegments = tmp.file('segments.qcow2');
  const img = await Qcow2Image.create(viaSegments, { virtualSize, clusterSize: cs });
  for (const { offset, data } of writes) {
    // Cut each write into segments over two buffers, the way the save describes its runs.
    const cut = Math.floor(data.length / 3);
    const buffers = [data.subarray(0, cut), data.subarray(cut)];
    const segs = new Float64Array([0, 0, cut, 1, 0, data.length - cut - 1, 1, data.length - cut - 1, 1]);
    assert.ok(img.writeSegmentsSync(offset, data.length, buffers, segs, 3), `write of ${data.length} at ${offset}`);
  }
  await img.close();
  assertClean(viaSegments);
  compareWithModel(toRaw(viaSegments, tmp.file('segments.raw')), virtualSize, writes);

  // A compressed cluster partly overwritten needs copy-on-write: declined, nothing changed.
  const raw = tmp.file('comp.raw');
  const text = Buffer.alloc(4 * cs, 'text ');
  require('node:fs').writeFileSync(raw, text);
  const comp = tmp.file('comp.qcow2');
  run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, comp]);
  const c = await Qcow2Image.open(comp, { writable: true });
  try {
    const one = Buffer.alloc(100, 7);
    assert.is(c.writeSegmentsSync(cs + 10, 100, [one], new Float64Array([0, 0, 100]), 1), false);
    assert.ok((await c.read(cs, cs)).equals(text.subarray(cs, 2 * cs)), 'untouched');
    // A whole compressed cluster is simply replaced.
    const whole = Buffer.alloc(cs, 9);
    assert.ok(c.writeSegmentsSync(2 * cs, cs, [whole], new Float64Array([0, 0, cs]), 1));
    assert.ok((await c.read(2 * cs, cs)).equals(whole));
  } finally {
    await c.close();
  }
  assertClean(comp);
});

test('one write plan: writev, writeSegmentsSync and a mix of the two build byte-identical image files', async () => {
  const cs = 64 * KiB;
  const virtualSize = 24 * MiB + 512;
  const writes = planWrites(virtualSize, cs, 1234);
  const vmState = prng(77)(3 * cs + 11);
  const build = async (name: string, useSegments: (i: number) => boolean): Promise<Buffer> => {
    const file = tmp.file(name);
    const img = await Qcow2Image.create(file, { virtualSize, clusterSize: cs });
    for (let i = 0; i < writes.length; i++) {
      const { offset, data } = writes[i];
      if (useSegments(i)) {
        const cut = Math.floor(data.length / 2);
        const segs = new Float64Array([1, 0, data.length - cut, 0, 0, cut]);
        // The pieces in order: buffer 1 holds the first part, buffer 0 the rest.
        assert.ok(img.writeSegmentsSync(offset, data.length, [data.subarray(data.length - cut), data.subarray(0, data.length - cut)], segs, 2));
      } else {
        const third = Math.floor(data.length / 3);
        await img.writev(offset, [data.subarray(0, third), data.subarray(third)]);
      }
    }
    await img.writeVmState(0, vmState);
    await img.close();
    assertClean(file);
    return require('node:fs').readFileSync(file) as Buffer;
  };
  const async = await build('plan-async.qcow2', () => false);
  const sync = await build('plan-sync.qcow2', () => true);
  const mixed = await build('plan-mixed.qcow2', (i) => i % 2 === 1);
  assert.ok(sync.equals(async), 'writeSegmentsSync image differs from the writev one');
  assert.ok(mixed.equals(async), 'mixed image differs from the writev one');
  compareWithModel(toRaw(tmp.file('plan-async.qcow2'), tmp.file('plan-async.raw')), virtualSize, writes);
});

test('reopened writable after close: overwrite, extend, more VM state', async () => {
  const path = tmp.file('reopen.qcow2');
  const cs = 512 * KiB;
  const size = 8 * MiB;
  const rand = prng(21);
  const model = Buffer.alloc(size);
  let img = await Qcow2Image.create(path, { virtualSize: size, clusterSize: cs, refcountBits: 8 });
  const a = rand(3 * cs);
  a.copy(model, cs / 2);
  await img.write(cs / 2, a);
  const vm1 = rand(cs + 5);
  await img.writeVmState(0, vm1);
  await img.close();
  assertClean(path);

  img = await Qcow2Image.open(path, { writable: true });
  const b = rand(cs);
  b.copy(model, cs);
  await img.write(cs, b); // inside an existing cluster
  const c = rand(100);
  c.copy(model, size - 100);
  await img.write(size - 100, c); // a new cluster
  const vm2 = rand(2 * cs);
  await img.writeVmState(cs + 5, vm2);
  await img.close();
  assertClean(path);

  img = await Qcow2Image.open(path);
  assert.ok((await img.read(0, size)).equals(model));
  assert.ok((await img.readVmState(0, cs + 5)).equals(vm1));
  assert.ok((await img.readVmState(cs + 5, 2 * cs)).equals(vm2));
  await img.close();
  assert.ok(readRegion(toRaw(path, tmp.file('reopen.raw')), 0, size).equals(model));
});

for (const refcountBits of [1, 2, 4, 8, 32, 64]) {
  test(`refcount width ${refcountBits} bits is accepted by qemu-img check`, async () => {
    const path = tmp.file(`rb${refcountBits}.qcow2`);
    const img = await Qcow2Image.create(path, { virtualSize: 32 * MiB, clusterSize: 64 * KiB, refcountBits });
    const data = prng(refcountBits)(5 * MiB);
    await img.write(3 * MiB + 17, data);
    await img.writeVmState(0, data.subarray(0, MiB));
    await img.close();
    assertClean(path);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', path]).stdout);
    assert.is(info['format-specific'].data['refcount-bits'], refcountBits);
    const re = await Qcow2Image.open(path);
    assert.ok((await re.read(3 * MiB + 17, data.length)).equals(data));
    await re.close();
  });
}

test('bad create options and out-of-range I/O are Qcow2Errors', async () => {
  await rejectsWith(Qcow2Image.create(tmp.file('x.qcow2'), { virtualSize: MiB, clusterSize: 32 * KiB }), /cluster size/);
  await rejectsWith(Qcow2Image.create(tmp.file('x.qcow2'), { virtualSize: MiB, clusterSize: 3 * 65536 }), /cluster size/);
  await rejectsWith(Qcow2Image.create(tmp.file('x.qcow2'), { virtualSize: MiB, refcountBits: 12 }), /refcount bits/);
  await rejectsWith(Qcow2Image.create(tmp.file('x.qcow2'), { virtualSize: 1000 }), /virtual size/);
  const img = await Qcow2Image.create(tmp.file('y.qcow2'), { virtualSize: MiB });
  assert.throws(() => img.read(MiB - 1, 2), /outside the virtual disk/);
  assert.throws(() => img.write(-1, Buffer.alloc(1)), /outside the virtual disk/);
  await img.close();
  const ro = await Qcow2Image.open(tmp.file('y.qcow2'));
  assert.throws(() => ro.write(0, Buffer.alloc(1)), /read-only/);
  await ro.close();
  assert.throws(() => ro.read(0, 1), /closed/);
});

test.run();
