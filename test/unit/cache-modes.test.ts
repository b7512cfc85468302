// Issue 14: the aligned buffer pool, O_DIRECT writes and reads of unaligned
// pieces, a QCOW2 image whose guest data goes through O_DIRECT while its
// metadata and VM state stay buffered, --max-in-flight as the number of
// direct writes really outstanding, segment writes inside the ring, the
// refusal of a file system without O_DIRECT, every mode writing the same
// bytes, and --aio=native (Linux AIO) and io_uring counted in the kernel. Needs the native module and a temporary directory that does O_DIRECT.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { Readable } from 'node:stream';
import { native } from '../../src/util/native';
import { alignedAllocator, openDirect, DirectFile, checkAioMode, cachePolicy } from '../../src/util/direct-io';
import { LinuxAio, LinuxAioStats } from '../../src/util/linux-aio';
import { RunBufferPool } from '../../src/snapshot/run-buffers';
import { Qcow2Image } from '../../src/image';
import { OrderedBlockWriter, BlockWrite, BlockWriteTarget } from '../../src/blockio';
import { saveSnapshot } from '../../src/snapshot/save';
import { loadSnapshot } from '../../src/snapshot/load';
import { StreamBuilder, completeStream } from './synthetic-stream';
import { prng } from '../helpers';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-cache-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
const CLI = path.resolve(__dirname, '..', '..', 'cli', 'qemu-snap.js');
const mod = native();
/** io_uring_disabled: 0 allows everyone, 1 root and io_uring_group, 2 no one; absent before Linux 6.6. */
const ioUringAllowed = (() => {
  try {
    return fs.readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim() !== '2';
  } catch {
    return true;
  }
})();

function bytes(seed: number, n: number): Buffer {
  const r = prng(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (r() * 256) | 0;
  return b;
}

function directFile(name: string, size: number): DirectFile {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.alloc(size));
  return openDirect(file, fs.constants.O_RDWR, 'test --cache=none');
}

test('cache modes have QEMU meanings; --aio native and io_uring say what is missing', () => {
  assert.equal(cachePolicy('none'), { mode: 'none', direct: true, dsync: false, flush: true });
  assert.equal(cachePolicy('directsync'), { mode: 'directsync', direct: true, dsync: true, flush: true });
  assert.equal(cachePolicy('writethrough'), { mode: 'writethrough', direct: false, dsync: true, flush: true });
  assert.equal(cachePolicy('unsafe'), { mode: 'unsafe', direct: false, dsync: false, flush: false });
  assert.equal(cachePolicy(), { mode: 'writeback', direct: false, dsync: false, flush: true });
  checkAioMode('threads');
  // As QEMU: aio=native needs cache.direct=on. qemu-snap uses io_uring for O_DIRECT only.
  for (const mode of ['writeback', 'writethrough', 'unsafe'] as const) {
    assert.throws(() => checkAioMode('native', cachePolicy(mode), 'load'), new RegExp(`^load --aio=native: needs --cache=none or --cache=directsync \\(.*cache.direct=on\\), not --cache=${mode}$`));
    assert.throws(() => checkAioMode('io_uring', cachePolicy(mode), 'save'), new RegExp(`^save --aio=io_uring: needs --cache=none or --cache=directsync \\(qemu-snap uses io_uring for its O_DIRECT I/O only\\), not --cache=${mode}$`));
  }
  if (mod) {
    for (const aio of ['native', 'io_uring'] as const) {
      if (aio === 'io_uring' && !ioUringAllowed) continue;
      checkAioMode(aio, cachePolicy('none'), 'save');
      checkAioMode(aio, cachePolicy('directsync'), 'save');
    }
  }
});

for (const kind of ['native', 'io_uring'] as const) test(`--aio=${kind} engine: at most maxInFlight requests in the kernel, the rest queued in order; results, short reads at the end, errors`, async () => {
  if (!mod) return console.log('  (skipped: no native module)');
  if (kind === 'io_uring' && !ioUringAllowed) return console.log('  (skipped: io_uring disabled by the kernel)');
  const file = path.join(dir, `aio-${kind}.bin`);
  fs.writeFileSync(file, '');
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_DIRECT);
  const aio = new LinuxAio(mod, 4, kind);
  try {
    const alloc = alignedAllocator(4096);
    const want = Buffer.alloc(32 * 65536);
    const writes: Promise<number>[] = [];
    for (let i = 0; i < 32; i++) {
      const b = alloc(65536);
      bytes(200 + i, 65536).copy(b);
      b.copy(want, i * 65536);
      writes.push(aio.pwritev(fd, [b.subarray(0, 4096), b.subarray(4096)], i * 65536));
    }
    // Completions are reaped on the main loop: nothing has been yet.
    assert.equal(aio.stats(), { inFlight: 4, peak: 4, submitted: 4, queued: 28 });
    assert.equal(await Promise.all(writes), new Array(32).fill(65536));
    assert.equal(aio.stats(), { inFlight: 0, peak: 4, submitted: 32, queued: 0 });
    assert.ok(fs.readFileSync(file).equals(want), 'every write landed where it was asked');
    const out = alloc(65536);
    assert.is(await aio.preadv(fd, [out], 7 * 65536), 65536);
    assert.ok(out.equals(want.subarray(7 * 65536, 8 * 65536)));
    assert.is(await aio.preadv(fd, [out], 31 * 65536 + 8192), 65536 - 8192, 'short at the end of the file');
    // An unaligned O_DIRECT write fails with the kernel's errno.
    const err = await aio.pwritev(fd, [Buffer.alloc(100)], 3).then(() => null, (e: NodeJS.ErrnoException) => e);
    assert.is(err?.code, 'EINVAL');
  } finally {
    aio.destroy();
  }
  // Closed with requests in the kernel and queued: it waits for the first, fails them all, and stays closed.
  const early = new LinuxAio(mod, 2, kind);
  const buf = alignedAllocator(4096)(1 << 20);
  const outcomes = [0, 1, 2, 3, 4].map((i) => early.pwritev(fd, [buf], i << 20).then(() => 'done', (e: NodeJS.ErrnoException) => String(e.code)));
  early.destroy();
  assert.equal(await Promise.all(outcomes), ['ECANCELED', 'ECANCELED', 'ECANCELED', 'ECANCELED', 'ECANCELED']);
  assert.is(await early.preadv(fd, [buf], 0).then(() => 'done', (e: NodeJS.ErrnoException) => String(e.code)), 'EBADF');
  fs.closeSync(fd);
});

test('the aligned pool hands out aligned buffers and takes them back', () => {
  if (!mod) return console.log('  (skipped: no native module)');
  const pool = new RunBufferPool(1 << 20, 4, alignedAllocator(4096));
  const taken = [pool.take(), pool.take(), pool.take()];
  for (const b of taken) {
    assert.is(b.length, 1 << 20);
    assert.is(mod.addressModulo(b, 4096), 0);
  }
  // A plain Buffer from Node's pool is, in general, not aligned.
  assert.ok([Buffer.from('x'), Buffer.from('yy'), Buffer.allocUnsafe(100)].some((b) => mod.addressModulo(b, 4096) !== 0));
  pool.release(taken[1].subarray(0, 4096));
  const again = pool.take();
  assert.is(again.buffer, taken[1].buffer, 'a released buffer is reused');
  assert.is(mod.addressModulo(again, 4096), 0);
});

test('O_DIRECT: unaligned writes and reads (offset, length, memory) give what buffered I/O gives', async () => {
  if (!mod) return console.log('  (skipped: no native module)');
  const size = 64 << 10;
  const df = directFile('unaligned.bin', size);
  const want = Buffer.alloc(size);
  const alloc = alignedAllocator(df.memAlign);
  try {
    const cases: Array<[number, Buffer[]]> = [
      [100, [bytes(1, 3000)]], // inside one sector
      [4000, [bytes(2, 200)]], // across a sector boundary
      [8192, [bytes(3, 4096)]], // aligned range, unaligned memory (Node's pool)
      [12288, [bytes(4, 1000), bytes(5, 7192)]], // aligned range in two pieces of odd lengths
      [size - 10, [bytes(6, 10)]], // the last bytes of the file
    ];
    const aligned = alloc(8192);
    bytes(7, 8192).copy(aligned);
    cases.push([32768, [aligned]]); // the straight path
    for (const [pos, slices] of cases) {
      const len = slices.reduce((n, b) => n + b.length, 0);
      await df.writev(pos, slices, len);
      Buffer.concat(slices).copy(want, pos);
    }
    assert.is(df.bounced, 5, 'every unaligned write went through the bounce buffer, the aligned one did not');
    assert.ok(fs.readFileSync(df.path).equals(want), 'the file holds every write');
    const out = Buffer.alloc(5000);
    await df.read(out, 7, 4321, 3333);
    assert.ok(out.subarray(7, 7 + 4321).equals(want.subarray(3333, 3333 + 4321)));
    const a = alloc(16384);
    await df.read(a, 4096, 8192, 8192);
    assert.ok(a.subarray(4096, 4096 + 8192).equals(want.subarray(8192, 16384)));
    // Past the end of the file reads as zeros.
    const tail = alloc(8192);
    tail.fill(0xff);
    await df.read(tail, 0, 8192, size - 4096);
    assert.ok(tail.subarray(0, 4096).equals(want.subarray(size - 4096)));
    assert.ok(tail.subarray(4096).equals(Buffer.alloc(4096)));
  } finally {
    df.close();
  }
});

test('a QCOW2 image with guest data under O_DIRECT: unaligned data, VM state and metadata are all right; qemu-img check is clean', async () => {
  if (!mod) return console.log('  (skipped: no native module)');
  const file = path.join(dir, 'direct.qcow2');
  const image = await Qcow2Image.create(file, { virtualSize: 8 << 20, clusterSize: 64 << 10 });
  const df = openDirect(file, fs.constants.O_RDWR, 'test --cache=none');
  image.setDataFile(df);
  const alloc = alignedAllocator(df.memAlign);
  const want = Buffer.alloc(8 << 20);
  const put = async (offset: number, data: Buffer): Promise<void> => {
    await image.write(offset, data);
    data.copy(want, offset);
  };
  const big = alloc(256 << 10);
  bytes(10, big.length).copy(big);
  await put(1 << 20, big); // aligned, crosses four clusters
  await put(100, bytes(11, 777)); // unaligned inside a fresh cluster
  await put((3 << 20) - 5, bytes(12, 4106)); // unaligned across a cluster boundary
  await put((1 << 20) + 4096 + 3, bytes(13, 50)); // partial rewrite of the aligned data
  const vmState = bytes(14, 100003);
  await image.writeVmState(17, vmState); // unaligned, through the buffered descriptor
  await image.flush({ sync: true });
  await image.close();
  df.close();
  const check = execFileSync('qemu-img', ['check', file], { encoding: 'utf8' });
  assert.match(check, /No errors were found/);
  const back = await Qcow2Image.open(file);
  try {
    assert.ok((await back.read(0, 8 << 20)).equals(want), 'guest data reads back');
    assert.ok((await back.readVmState(17, vmState.length)).equals(vmState), 'VM state reads back');
  } finally {
    await back.close();
  }
  // And through O_DIRECT reads.
  const ro = await Qcow2Image.open(file);
  const rd = openDirect(file, fs.constants.O_RDONLY, 'test --cache=none');
  ro.setDataFile(rd);
  try {
    const out = alloc(8 << 20);
    await ro.readInto(0, 8 << 20, out, 0);
    assert.ok(out.equals(want));
    assert.ok((await ro.read(101, 5000)).equals(want.subarray(101, 5101)), 'unaligned reads bounce');
  } finally {
    await ro.close();
    rd.close();
  }
});

/** pc.ram of 64 MiB with one page in each MiB: 64 runs, so 64 separate block writes. */
function scatteredStream(): Buffer {
  const ps = 4096;
  const blocks = [{ id: 'pc.ram', length: 64 << 20 }];
  const b = new StreamBuilder().header().configuration();
  b.sectionStart(2).memSize(blocks).eos().footer(2);
  b.sectionPart(2);
  for (let i = 0; i < 64; i++) b.page(i * (1 << 20) + 8192, i === 0 ? 'pc.ram' : null, bytes(100 + i, ps));
  b.eos().footer(2);
  b.sectionEnd(2).eos().footer(2);
  b.device(3, 'timer', Buffer.from([1, 2, 3]));
  b.eof();
  return b.build();
}

test('--max-in-flight bounds the O_DIRECT writes really outstanding', async () => {
  if (!mod) return console.log('  (skipped: no native module)');
  const proto = DirectFile.prototype;
  const realWritev = proto.writev;
  let outstanding = 0;
  let most = 0;
  let calls = 0;
  // Every O_DIRECT write of the save, held a little so that the ring has
  // every chance to exceed its bound.
  proto.writev = function (this: DirectFile, position: number, slices: Buffer[], length: number): Promise<void> {
    outstanding++;
    calls++;
    most = Math.max(most, outstanding);
    return new Promise<void>((r) => setTimeout(r, 2))
      .then(() => realWritev.call(this, position, slices, length))
      .finally(() => outstanding--);
  };
  try {
    for (const n of [1, 3]) {
      most = 0;
      calls = 0;
      const image = path.join(dir, `inflight-${n}.qcow2`);
      await saveSnapshot(Readable.from([scatteredStream()]), image, { cache: 'none', maxInFlight: n });
      assert.is(calls, 64, 'one direct write per run');
      assert.is(most, n, `at most (and, with a slow disk, exactly) ${n} in flight`);
    }
  } finally {
    proto.writev = realWritev;
  }
});

/** The kernel-side figures of every Linux AIO engine closed while `fn` runs. */
async function aioPeaks(fn: () => Promise<void>): Promise<LinuxAioStats[]> {
  const proto = LinuxAio.prototype;
  const realDestroy = proto.destroy;
  const seen: LinuxAioStats[] = [];
  proto.destroy = function (this: LinuxAio): void {
    seen.push(this.stats());
    realDestroy.call(this);
  };
  try {
    await fn();
  } finally {
    proto.destroy = realDestroy;
  }
  return seen;
}

for (const kind of ['native', 'io_uring'] as const) test(`--aio=${kind}: --max-in-flight is the number of requests in the kernel at once, save and load`, async () => {
  if (!mod) return console.log('  (skipped: no native module)');
  if (kind === 'io_uring' && !ioUringAllowed) return console.log('  (skipped: io_uring disabled by the kernel)');
  const image = path.join(dir, `aio-inflight-${kind}.qcow2`);
  const want = path.join(dir, `aio-inflight-${kind}.want`);
  for (const n of [1, 3, 8]) {
    const saved = await aioPeaks(() => saveSnapshot(Readable.from([scatteredStream()]), image, { cache: 'none', aio: kind, maxInFlight: n, force: true }).then(() => undefined));
    assert.is(saved.length, 1, 'one engine, for the O_DIRECT descriptor');
    assert.is(saved[0].submitted, 64, 'one request per run, all through Linux AIO');
    assert.ok(saved[0].peak >= 1 && saved[0].peak <= n, `save: at most ${n} in the kernel (peak ${saved[0].peak})`);
    if (n === 1) await loadSnapshot(image, { output: want });
    const out = path.join(dir, `aio-inflight-${kind}-${n}.out`);
    const loaded = await aioPeaks(() => loadSnapshot(image, { output: out, cache: 'none', aio: kind, maxInFlight: n }).then(() => undefined));
    assert.is(loaded.length, 1);
    assert.ok(loaded[0].submitted >= 64, `every data read went through Linux AIO (${loaded[0].submitted})`);
    assert.ok(loaded[0].peak >= 1 && loaded[0].peak <= n, `load: at most ${n} in the kernel (peak ${loaded[0].peak})`);
    if (n > 1) assert.ok(loaded[0].peak > 1, `load: reads really overlap (peak ${loaded[0].peak})`);
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(want)), 'the same stream as a buffered load');
  }
});

test('load --cache=none: --max-in-flight bounds the O_DIRECT reads really outstanding', async () => {
  if (!mod) return console.log('  (skipped: no native module)');
  const image = path.join(dir, 'inflight-load.qcow2');
  await saveSnapshot(Readable.from([scatteredStream()]), image, { force: true });
  const want = path.join(dir, 'inflight-load.want');
  await loadSnapshot(image, { output: want });
  const proto = DirectFile.prototype;
  const realRead = proto.read;
  let outstanding = 0;
  let most = 0;
  let calls = 0;
  proto.read = function (this: DirectFile, out: Buffer, at: number, length: number, position: number): Promise<void> {
    outstanding++;
    calls++;
    most = Math.max(most, outstanding);
    return new Promise<void>((r) => setTimeout(r, 2))
      .then(() => realRead.call(this, out, at, length, position))
      .finally(() => outstanding--);
  };
  try {
    for (const n of [1, 3]) {
      most = 0;
      calls = 0;
      const out = path.join(dir, `inflight-load-${n}.out`);
      await loadSnapshot(image, { output: out, cache: 'none', maxInFlight: n });
      assert.ok(calls >= 64, `every data read went through O_DIRECT (${calls})`);
      assert.is(most, n, `at most (and, with a slow disk, exactly) ${n} reads in flight`);
      assert.ok(fs.readFileSync(out).equals(fs.readFileSync(want)), 'the same stream as a buffered load');
    }
  } finally {
    proto.read = realRead;
  }
});

test('segment writes in the ring: written synchronously by a target that can, as pieces by one that cannot; completions in order', async () => {
  const a = Buffer.from('abcdefgh');
  const b = Buffer.from('ABCDEFGH');
  const seg = (offset: number): BlockWrite => ({ offset, length: 6, buffers: [a, b], segments: Float64Array.from([0, 0, 2, 1, 2, 2, 0, 6, 2]), count: 3 });
  const log: string[] = [];
  class Target implements BlockWriteTarget {
    constructor(readonly sync: boolean) {}
    writeSync(w: BlockWrite): boolean {
      if (!this.sync) return false;
      log.push(`sync ${w.offset}`);
      return true;
    }
    async writev(offset: number, buffers: Buffer[]): Promise<void> {
      log.push(`writev ${offset} ${Buffer.concat(buffers).toString()}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }
  for (const sync of [true, false]) {
    log.length = 0;
    const done: number[] = [];
    const ring = new OrderedBlockWriter(new Target(sync), { maxInFlight: 2, onComplete: (_w, seq) => done.push(seq) });
    ring.write({ offset: 100, length: 3, buffers: [Buffer.from('xyz')] });
    ring.write(seg(0));
    ring.write(seg(6));
    ring.end();
    await new Promise((resolve, reject) => ring.on('finish', () => resolve(null)).on('error', reject));
    assert.equal(done, [0, 1, 2]);
    assert.equal(log, sync ? ['writev 100 xyz', 'sync 0', 'sync 6'] : ['writev 100 xyz', 'writev 0 abCDgh', 'writev 6 abCDgh']);
  }
  const bad = new OrderedBlockWriter(new Target(true));
  const failed = new Promise<Error>((resolve) => bad.on('error', resolve));
  bad.write({ offset: 0, length: 6, buffers: [a], segments: Float64Array.from([0, 4, 6]), count: 1 });
  assert.match((await failed).message, /segment 0 lies outside its buffer/);
});

/** Mounts a file system without O_DIRECT: ramfs (root), else /dev/shm if its tmpfs refuses O_DIRECT (before Linux 6.6). */
function noDirectDir(): { path: string; cleanup(): void } | null {
  const mnt = fs.mkdtempSync(path.join(dir, 'ramfs-'));
  if (spawnSync('mount', ['-t', 'ramfs', 'qemu-snap-test', mnt]).status === 0) {
    return { path: mnt, cleanup: () => void spawnSync('umount', [mnt]) };
  }
  try {
    const probe = path.join('/dev/shm', `qemu-snap-probe-${process.pid}`);
    fs.writeFileSync(probe, '');
    try {
      fs.closeSync(fs.openSync(probe, fs.constants.O_RDONLY | fs.constants.O_DIRECT));
    } catch {
      return { path: fs.mkdtempSync('/dev/shm/qemu-snap-'), cleanup: () => undefined };
    } finally {
      fs.unlinkSync(probe);
    }
  } catch {
    // no /dev/shm
  }
  return null;
}

test('a file system without O_DIRECT: save and load --cache=none/directsync refuse in one line naming mode and file, nothing left behind', () => {
  if (!mod) return console.log('  (skipped: no native module)');
  const fsys = noDirectDir();
  if (!fsys) return console.log('  (skipped: no file system without O_DIRECT here: not root for ramfs, and tmpfs does O_DIRECT since Linux 6.6)');
  try {
    const stream = path.join(dir, 'complete.stream');
    fs.writeFileSync(stream, completeStream());
    const image = path.join(fsys.path, 'vm.qcow2');
    for (const args of [['-n'], ['--cache=none'], ['--cache=directsync'], ['--nocache']]) {
      const r = spawnSync(process.execPath, [CLI, 'save', ...args, '-i', stream, image], { encoding: 'utf8' });
      assert.is(r.status, 1, r.stderr);
      const mode = args[0] === '--cache=directsync' ? 'directsync' : 'none';
      assert.is(r.stderr, `qemu-snap: save --cache=${mode}: ${image}: the file system does not support O_DIRECT (direct I/O); use --cache=writeback\n`);
      assert.equal(fs.readdirSync(fsys.path), [], 'nothing left behind');
    }
    // The image saved buffered there loads buffered, and is refused direct.
    const ok = spawnSync(process.execPath, [CLI, 'save', '-q', '-i', stream, image], { encoding: 'utf8' });
    assert.is(ok.status, 0, ok.stderr);
    const r = spawnSync(process.execPath, [CLI, 'load', '--cache=none', '-o', path.join(dir, 'x.out'), image], { encoding: 'utf8' });
    assert.is(r.status, 1);
    assert.is(r.stderr, `qemu-snap: load --cache=none: ${image}: the file system does not support O_DIRECT (direct I/O); use --cache=writeback\n`);
    fs.unlinkSync(image);
  } finally {
    fsys.cleanup();
  }
});

test('--aio=native with a buffered cache mode: save and load refuse in one line, as QEMU does, nothing left behind', () => {
  const stream = path.join(dir, 'aio-refused.stream');
  fs.writeFileSync(stream, completeStream());
  const out = fs.mkdtempSync(path.join(dir, 'aio-refused-'));
  const image = path.join(out, 'vm.qcow2');
  for (const mode of ['writeback', 'unsafe']) {
    const r = spawnSync(process.execPath, [CLI, 'save', `--cache=${mode}`, '--aio=native', '-i', stream, image], { encoding: 'utf8' });
    assert.is(r.status, 1, r.stderr);
    assert.is(r.stderr.split('\n').length, 2, r.stderr);
    assert.match(r.stderr, new RegExp(`^qemu-snap: save --aio=native: needs --cache=none or --cache=directsync .*cache\\.direct=on.*, not --cache=${mode}\n$`));
    assert.equal(fs.readdirSync(out), [], 'nothing left behind');
  }
  const ok = spawnSync(process.execPath, [CLI, 'save', '-q', '-i', stream, image], { encoding: 'utf8' });
  assert.is(ok.status, 0, ok.stderr);
  const r = spawnSync(process.execPath, [CLI, 'load', '--aio=native', '-o', path.join(out, 'x.out'), image], { encoding: 'utf8' });
  assert.is(r.status, 1);
  assert.match(r.stderr, /^qemu-snap: load --aio=native: needs --cache=none or --cache=directsync .*, not --cache=writeback\n$/);
  assert.equal(fs.readdirSync(out), ['vm.qcow2']);
});

test('every cache mode, with and without the native module, writes the same image and loads the same stream', async () => {
  const stream = path.join(dir, 'modes.stream');
  fs.writeFileSync(stream, scatteredStream());
  const runs: Array<[string[], NodeJS.ProcessEnv]> = [
    [['--cache=writeback'], {}],
    [['--cache=writeback'], { QEMU_SNAP_NATIVE: '0' }],
    [['--cache=unsafe'], {}],
    [['--cache=writethrough'], {}],
  ];
  if (mod) {
    runs.push([['--cache=none'], {}], [['--cache=directsync'], {}], [['-n', '--max-in-flight', '1'], {}]);
    runs.push([['-n', '--aio=native'], {}], [['--cache=directsync', '--aio=native', '--max-in-flight', '2'], {}]);
    if (ioUringAllowed) runs.push([['-n', '--aio=io_uring', '--max-in-flight', '3'], {}]);
  }
  let first: Buffer | null = null;
  let firstStream: Buffer | null = null;
  for (const [args, env] of runs) {
    const image = path.join(dir, 'mode.qcow2');
    const r = spawnSync(process.execPath, [CLI, 'save', '-q', '-f', ...args, '-i', stream, image], { encoding: 'utf8', env: { ...process.env, ...env } });
    assert.is(r.status, 0, r.stderr);
    const bytesNow = fs.readFileSync(image);
    if (first === null) first = bytesNow;
    else assert.ok(first.equals(bytesNow), `save ${args.join(' ')} ${JSON.stringify(env)}: the same image`);
    const loads: Array<Parameters<typeof loadSnapshot>[1]> = mod ? [{}, { cache: 'none', maxInFlight: 3 }, { cache: 'none', aio: 'native', maxInFlight: 5 }] : [{}];
    if (mod && ioUringAllowed) loads.push({ cache: 'directsync', aio: 'io_uring', maxInFlight: 2 });
    for (const load of loads) {
      const out = path.join(dir, 'mode.out');
      await loadSnapshot(image, { output: out, ...load });
      const s = fs.readFileSync(out);
      if (firstStream === null) firstStream = s;
      else assert.ok(firstStream.equals(s), `load ${JSON.stringify(load)} of save ${args.join(' ')}: the same stream`);
    }
  }
});

test.run();
