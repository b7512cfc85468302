// The native module against what it replaces: its XXH64 against
// hash-wasm's, gathered writes against the bytes they describe (through
// IOV_MAX batches, partial writes and a full non-blocking pipe), mapped
// views against read(2), pipe resizing against the kernel's answer. CI
// builds the module (QEMU_SNAP_REQUIRE_NATIVE=1); it must be there.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { native, nativeUnavailableReason, NativeModule } from '../../src/util/native';
import { createChunkHasher } from '../../src/snapshot/chunk-hash';
import { prng } from '../helpers';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-native-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function mod(): NativeModule {
  const m = native();
  if (!m) throw new Error(`the native module is not loaded: ${nativeUnavailableReason()}`);
  return m;
}

function randomBytes(n: number, seed: number): Buffer {
  const r = prng(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (r() * 256) | 0;
  return b;
}

test('the module is built and loads', () => {
  assert.ok(native(), `native module: ${nativeUnavailableReason()}`);
});

test('XXH64: the empty input gives the published digest', () => {
  const m = mod();
  const st = Buffer.alloc(m.xxh64StateBytes);
  m.xxh64Reset(st);
  // XXH64("", seed 0) = 0xEF46DB3751D8E999.
  assert.is(m.xxh64Low(st), 0x51d8e999);
});

test('XXH64: native and WebAssembly agree on every length and every way of cutting the input', async () => {
  const nat = await createChunkHasher('xxh64', true);
  const wasm = await createChunkHasher('xxh64', false);
  assert.is.not(nat.constructor, wasm.constructor, 'two implementations');
  const r = prng(3);
  const data = randomBytes(300_000, 9);
  for (let t = 0; t < 400; t++) {
    const len = t < 100 ? t : Math.floor(r() * data.length);
    const start = Math.floor(r() * (data.length - len));
    const d = data.subarray(start, start + len);
    nat.begin();
    for (let at = 0; at < len; ) {
      const k = Math.min(len - at, 1 + Math.floor(r() * (t % 2 === 0 ? 40 : 70_000)));
      nat.update(d.subarray(at, at + k));
      at += k;
    }
    assert.is(nat.end(), wasm.whole(d), `length ${len}`);
  }
  assert.is(nat.zeroChunk(1 << 20), wasm.zeroChunk(1 << 20));
});

test('XXH64: a state buffer that is too small or misaligned is refused', () => {
  const m = mod();
  assert.throws(() => m.xxh64Reset(Buffer.alloc(8)));
  const big = Buffer.alloc(m.xxh64StateBytes + 8);
  assert.throws(() => m.xxh64Reset(big.subarray(1)));
});

/** Segments over `buffers` cut at random, and the bytes they describe. */
function randomSegments(buffers: Buffer[], count: number, seed: number): { segs: Float64Array; want: Buffer } {
  const r = prng(seed);
  const segs = new Float64Array(count * 3);
  const parts: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const b = Math.floor(r() * buffers.length);
    const off = Math.floor(r() * buffers[b].length);
    const len = Math.floor(r() * Math.min(buffers[b].length - off, 9000));
    segs.set([b, off, len], i * 3);
    parts.push(buffers[b].subarray(off, off + len));
  }
  return { segs, want: Buffer.concat(parts) };
}

test('writeSegments writes every piece in order, across several writev batches', () => {
  const m = mod();
  const buffers = [randomBytes(100_000, 1), randomBytes(5000, 2), randomBytes(70_000, 3)];
  const { segs, want } = randomSegments(buffers, 2500, 4);
  const file = path.join(dir, 'segments.bin');
  const fd = fs.openSync(file, 'w');
  try {
    assert.is(m.writeSegments(fd, buffers, segs, 2500), want.length);
  } finally {
    fs.closeSync(fd);
  }
  assert.ok(fs.readFileSync(file).equals(want));
});

test('writeSegments into a full non-blocking pipe waits for the reader and loses nothing', async () => {
  const m = mod();
  const fifo = path.join(dir, 'seg-fifo');
  execFileSync('mkfifo', [fifo]);
  const out = path.join(dir, 'seg-fifo.out');
  // A slow reader: the 64 KiB pipe fills at once, writev returns short and then EAGAIN.
  const reader = spawn('sh', ['-c', `sleep 0.2; cat '${fifo}' > '${out}'`], { stdio: 'ignore' });
  const fd = fs.openSync(fifo, fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
  const buffers = [randomBytes(1 << 20, 5), randomBytes(3000, 6)];
  const { segs, want } = randomSegments(buffers, 1500, 7);
  try {
    assert.is(m.writeSegments(fd, buffers, segs, 1500), want.length);
  } finally {
    fs.closeSync(fd);
  }
  await new Promise((res) => reader.on('exit', res));
  assert.ok(fs.readFileSync(out).equals(want), `${want.length} bytes through the pipe`);
});

test('writeSegments refuses pieces outside their buffer and too many buffers, writing nothing', () => {
  const m = mod();
  const file = path.join(dir, 'refused.bin');
  const fd = fs.openSync(file, 'w');
  try {
    const b = Buffer.alloc(100);
    assert.throws(() => m.writeSegments(fd, [b], new Float64Array([0, 90, 11]), 1), /out of range/);
    assert.throws(() => m.writeSegments(fd, [b], new Float64Array([1, 0, 1]), 1), /out of range/);
    assert.throws(() => m.writeSegments(fd, [b], new Float64Array([0, 0, 1]), 2), /segments/);
    assert.throws(() => m.writeSegments(fd, Array.from({ length: 17 }, () => b), new Float64Array([0, 0, 1]), 1), /16 buffers/);
  } finally {
    fs.closeSync(fd);
  }
  assert.is(fs.statSync(file).size, 0);
});

test('writeSegments reports a closed reader as EPIPE', () => {
  const m = mod();
  const fifo = path.join(dir, 'epipe-fifo');
  execFileSync('mkfifo', [fifo]);
  const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const wr = fs.openSync(fifo, 'w');
  fs.closeSync(rd);
  try {
    assert.throws(
      () => m.writeSegments(wr, [Buffer.alloc(10)], new Float64Array([0, 0, 10]), 1),
      (e: NodeJS.ErrnoException) => e.code === 'EPIPE',
    );
  } finally {
    fs.closeSync(wr);
  }
});

test('pwriteSegments writes any byte range of the segments at any file offset', () => {
  const m = mod();
  const buffers = [randomBytes(50_000, 11), randomBytes(9000, 12)];
  const { segs, want } = randomSegments(buffers, 1500, 13);
  const file = path.join(dir, 'pwrite.bin');
  const fd = fs.openSync(file, 'w+');
  try {
    const r = prng(14);
    const model = Buffer.alloc(want.length + 100_000);
    for (let t = 0; t < 40; t++) {
      const skip = Math.floor(r() * want.length);
      const length = t === 0 ? want.length - skip : Math.floor(r() * (want.length - skip));
      const position = Math.floor(r() * 100_000);
      assert.is(m.pwriteSegments(fd, position, buffers, segs, 1500, skip, length), length);
      want.copy(model, position, skip, skip + length);
    }
    const got = fs.readFileSync(file);
    assert.ok(got.equals(model.subarray(0, got.length)), 'the file matches a model of the writes');
    assert.throws(() => m.pwriteSegments(fd, 0, buffers, segs, 1500, want.length - 10, 11), /fewer bytes/);
  } finally {
    fs.closeSync(fd);
  }
});

test('xxh64UpdateSegments digests the bytes the segments describe', async () => {
  const m = mod();
  const buffers = [randomBytes(40_000, 15), randomBytes(700, 16)];
  const { segs, want } = randomSegments(buffers, 300, 17);
  const st = Buffer.alloc(m.xxh64StateBytes);
  m.xxh64Reset(st);
  m.xxh64UpdateSegments(st, buffers, segs, 300);
  const wasm = await createChunkHasher('xxh64', false);
  assert.is(m.xxh64Low(st), wasm.whole(want));
});

test('copySegments copies the bytes the segments describe, and with a state digests them in the same pass', async () => {
  const m = mod();
  const copy = m.copySegments;
  if (copy === undefined) throw new Error('copySegments missing from the native module');
  const buffers = [randomBytes(40_000, 18), randomBytes(700, 19)];
  const { segs, want } = randomSegments(buffers, 300, 20);
  const into = Buffer.alloc(want.length + 5, 0xee);
  assert.is(copy(into, buffers, segs, 300), want.length);
  assert.ok(into.subarray(0, want.length).equals(want));
  assert.is(into[want.length], 0xee, 'nothing written past the segments');
  const st = Buffer.alloc(m.xxh64StateBytes);
  m.xxh64Reset(st);
  m.xxh64Update(st, Buffer.from('a prefix of 19 bytes'));
  into.fill(0);
  assert.is(copy(into, buffers, segs, 300, st), want.length);
  assert.ok(into.subarray(0, want.length).equals(want));
  const wasm = await createChunkHasher('xxh64', false);
  assert.is(m.xxh64Low(st), wasm.whole(Buffer.concat([Buffer.from('a prefix of 19 bytes'), want])));
  // A destination too small for the segments is refused before anything is copied.
  const small = Buffer.alloc(want.length - 1, 0xee);
  assert.throws(() => copy(small, buffers, segs, 300), /more bytes than the destination/);
  assert.ok(small.every((b) => b === 0xee));
  assert.throws(() => copy(into, buffers, segs, 300, Buffer.alloc(4)));
});

test('mapFile shows the file as read(2) does, before and after its pages are dropped', () => {
  const m = mod();
  const file = path.join(dir, 'mapped.bin');
  const data = randomBytes(3 * 65536 + 100, 8);
  fs.writeFileSync(file, data);
  const fd = fs.openSync(file, 'r');
  try {
    const view = m.mapFile(fd, 65536, data.length - 65536);
    assert.ok(view.equals(data.subarray(65536)));
    m.dropPages(view.subarray(100, 70_000));
    m.dropPages(view);
    assert.ok(view.equals(data.subarray(65536)), 'dropped pages come back from the page cache');
    assert.throws(() => m.mapFile(fd, 100, 4096), (e: NodeJS.ErrnoException) => e.code === 'EINVAL', 'offset not page-aligned');
    assert.throws(() => m.mapFile(fd, 0, 0), (e: NodeJS.ErrnoException) => e.code === 'EINVAL');
  } finally {
    fs.closeSync(fd);
  }
});

test('pipeSize grows a pipe and reports what the kernel granted', () => {
  const m = mod();
  const fifo = path.join(dir, 'size-fifo');
  execFileSync('mkfifo', [fifo]);
  const fd = fs.openSync(fifo, fs.constants.O_RDWR);
  try {
    assert.is(m.pipeSize(fd, 1 << 20), 1 << 20);
    assert.is(m.pipeSize(fd, 100_000), 128 << 10, 'rounded up to a power-of-two number of pages');
  } finally {
    fs.closeSync(fd);
  }
  const file = path.join(dir, 'not-a-pipe');
  fs.writeFileSync(file, '');
  const f = fs.openSync(file, 'r');
  try {
    assert.throws(() => m.pipeSize(f, 1 << 20), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
  } finally {
    fs.closeSync(f);
  }
});

test.run();
