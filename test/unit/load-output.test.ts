// The load's fast paths against their plain counterparts: synchronous fd
// output (one reused buffer) writes the same bytes as the queued stream
// output, chunk digests fed in batched pieces match each chunk hashed whole
// (and the verify worker's), and a lent record buffer is reused.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { execFileSync } from 'node:child_process';
import { Writable } from 'streamx';
import { Writable as NodeWritable } from 'node:stream';
import { StreamBuilder, SyntheticBlock } from './synthetic-stream';
import { prng } from '../helpers';
import { saveSnapshot } from '../../src/snapshot/save';
import { loadSnapshot } from '../../src/snapshot/load';
import { ChunkDigester } from '../../src/snapshot/digests';
import { InlinePieceDigester, PieceDigester } from '../../src/snapshot/digest-pieces';
import { createChunkHasher } from '../../src/snapshot/chunk-hash';
import { RamRecordWriter, ramBlockName } from '../../src/migration/ram-writer';
import { FdWriter, FdWriteError } from '../../src/util/fd-writer';

const PS = 4096;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-load-output-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function randomBytes(n: number, seed: number): Buffer {
  const r = prng(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (r() * 256) | 0;
  return b;
}

// 3 MiB of pc.ram (more than one read and one output chunk), every 7th page zero.
const BIG: SyntheticBlock[] = [
  { id: 'pc.ram', length: 768 * PS },
  { id: '/rom@etc/acpi/tables', length: 2 * PS },
];

function bigStream(): Buffer {
  const b = new StreamBuilder().header().configuration();
  b.sectionStart(2).memSize(BIG).eos().footer(2);
  const data = randomBytes(768 * PS, 7);
  b.sectionPart(2);
  for (let p = 0; p < 768; p++) {
    if (p % 7 === 3) b.zero(p * PS, p === 0 ? 'pc.ram' : null);
    else b.page(p * PS, p === 0 ? 'pc.ram' : null, data.subarray(p * PS, (p + 1) * PS));
  }
  b.page(PS, '/rom@etc/acpi/tables', Buffer.alloc(PS, 5)).eos().footer(2);
  b.sectionEnd(2).eos().footer(2);
  b.device(3, 'timer', Buffer.from([1, 2, 3]));
  b.eof().vmdesc({ page_size: PS, devices: [{ name: 'timer', instance_id: 0, version: 1 }] });
  return b.build();
}

function collector(): { sink: Writable; bytes: () => Buffer } {
  const parts: Buffer[] = [];
  const sink = new Writable({
    write(b: unknown, cb: (e: Error | null) => void) {
      parts.push(Buffer.from(b as Buffer));
      cb(null);
    },
  });
  return { sink, bytes: () => Buffer.concat(parts) };
}

let image = '';
test.before(async () => {
  image = path.join(dir, 'big.qcow2');
  await saveSnapshot(require('node:stream').Readable.from([bigStream()]), image, { clusterSize: 64 << 10 });
});

test('--output (synchronous, one reused buffer) and a queued stream write the same bytes', async () => {
  const file = path.join(dir, 'big.stream');
  const direct = await loadSnapshot(image, { output: file });
  const c = collector();
  const queued = await loadSnapshot(image, { stdout: c.sink as unknown as NodeJS.WritableStream });
  const a = fs.readFileSync(file);
  assert.is(a.length, direct.streamBytes);
  assert.ok(a.length > 600 * PS, 'the stream holds the pages');
  assert.ok(a.equals(c.bytes()), 'same stream either way');
  assert.is(direct.dataPagesSent, queued.dataPagesSent);
  assert.is(direct.dataPagesSent, 768 - 110 + 1);
});

test('an interrupted load settles when its output stopped taking writes after the whole stream was handed to it (a destination that stopped reading)', async () => {
  // Takes every write into its buffer but never completes the first: the
  // pipeline before it ends normally, and only the abort can end the load.
  const stuck = new NodeWritable({ highWaterMark: 64 << 20, write: () => undefined });
  const ac = new AbortController();
  const loading = loadSnapshot(image, { stdout: stuck, signal: ac.signal }).then(
    () => null,
    (e: Error) => e,
  );
  for (let i = 0; i < 500 && !stuck.writableEnded; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(stuck.writableEnded, 'the whole stream was handed over');
  ac.abort('test');
  const err = await Promise.race([loading, new Promise<string>((r) => setTimeout(() => r('hung'), 5000))]);
  assert.instance(err, Error, `the load settles (got ${String(err)})`);
  assert.match((err as Error).message, /load interrupted \(test\)/);
  assert.ok(stuck.destroyed, 'the output is destroyed');
});

test('an FdWriter on a pipe is written synchronously and the stream reaches the reader whole', async () => {
  const file = path.join(dir, 'big.stream');
  const expected = fs.readFileSync(file);
  // A shell pipe: load → fd of `cat > FILE`'s stdin.
  const out = path.join(dir, 'piped.stream');
  const { spawn } = require('node:child_process') as typeof import('node:child_process');
  const cat = spawn('sh', ['-c', `cat > '${out}'`], { stdio: ['pipe', 'ignore', 'inherit'] });
  const fd = (cat.stdin as unknown as { _handle: { fd: number } })._handle.fd;
  const w = new FdWriter(fd);
  const r = await loadSnapshot(image, { stdout: w as unknown as NodeJS.WritableStream });
  assert.is(w.bytesWritten, r.streamBytes, 'every byte went through writeSync');
  cat.stdin?.end();
  await new Promise((res) => cat.on('exit', res));
  assert.ok(fs.readFileSync(out).equals(expected));
});

test('writeSync writes a pipe whole and reports a closed reader as EPIPE', () => {
  const fifo = path.join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const wr = fs.openSync(fifo, 'w');
  const w = new FdWriter(wr);
  try {
    w.writeSync(Buffer.from('hello'));
    const got = Buffer.alloc(10);
    assert.is(fs.readSync(rd, got), 5);
    fs.closeSync(rd);
    assert.throws(() => w.writeSync(Buffer.alloc(10)), (err: Error) => err instanceof FdWriteError && /EPIPE/.test(err.message));
    assert.is(w.bytesWritten, 5);
  } finally {
    fs.closeSync(wr);
  }
});

async function chunkDigests(d: PieceDigester, data: Buffer, cuts: number[], cs: number): Promise<Map<number, number>> {
  const got = new Map<number, number>();
  d.onChunkDigest = (c, crc) => got.set(c, crc);
  let prev = 0;
  for (const cut of [...cuts, data.length]) {
    const items: number[] = [];
    for (let at = prev; at < cut; ) {
      const c = Math.floor(at / cs);
      const n = Math.min(cut, (c + 1) * cs) - at;
      items.push(c, at - prev, at - prev + n, 0, (at + n) % cs === 0 ? 1 : 0);
      at += n;
    }
    d.pieces(Buffer.from(data.subarray(prev, cut)), items);
    prev = cut;
  }
  return got;
}

test('chunk digests from batched pieces match each chunk hashed whole, for both algorithms; the worker agrees', async () => {
  const cs = 64 << 10;
  const data = randomBytes(4 * cs, 3);
  data.fill(0, cs + 100, 2 * cs); // some zeros in the mix
  const cuts = [1000, cs + 7, 3 * cs - 4096, 3 * cs];
  for (const alg of ['xxh64', 'crc32'] as const) {
    const whole = await createChunkHasher(alg);
    const want = new Map<number, number>();
    for (let c = 0; c < 4; c++) want.set(c, whole.whole(data.subarray(c * cs, (c + 1) * cs)));
    assert.equal(await chunkDigests(new InlinePieceDigester(await createChunkHasher(alg)), data, cuts, cs), want, alg);
    if (alg === 'crc32') assert.is(want.get(0), zlib.crc32(data.subarray(0, cs)), 'version 1 digests are plain CRC-32');
    // zeros fed without data
    const d = new InlinePieceDigester(await createChunkHasher(alg));
    const got = new Map<number, number>();
    d.onChunkDigest = (c, v) => got.set(c, v);
    const keep = randomBytes(300, 9);
    d.pieces(keep, [7, 100, 300, 50, 1]);
    assert.is(got.get(7), whole.whole(Buffer.concat([keep.subarray(100), Buffer.alloc(50)])), `${alg}: data then zeros`);
    const worker = new ChunkDigester(PS, alg);
    try {
      const r = await worker.digest(Buffer.from(data.subarray(cs, 2 * cs)));
      assert.is(r.crc, want.get(1), `${alg}: worker`);
    } finally {
      await worker.close();
    }
  }
});

test('pieces of a chunk while another is still open: an error, not a wrong digest', async () => {
  const d = new InlinePieceDigester(await createChunkHasher('xxh64'));
  d.pieces(Buffer.alloc(10), [1, 0, 10, 0, 0]);
  assert.throws(() => d.pieces(Buffer.alloc(10), [2, 0, 10, 0, 1]), /chunk 1 is still open/);
});

test('a lent record buffer is reused and the bytes match a writer that gives its chunks away', () => {
  const name = ramBlockName('pc.ram');
  const data = randomBytes(40 * PS, 11);
  const run = (lend: boolean): { bytes: Buffer; buffers: Set<ArrayBufferLike> } => {
    const parts: Buffer[] = [];
    const buffers = new Set<ArrayBufferLike>();
    const w = new RamRecordWriter(2, PS, (chunk) => {
      buffers.add(chunk.buffer);
      parts.push(Buffer.from(chunk)); // a lent chunk is only valid during the call
    }, 64 << 10, lend);
    w.raw(Buffer.from([1, 2, 3]));
    for (let p = 0; p < 40; p++) {
      w.beginSection();
      if (p % 5 === 0) w.zero(name, p * PS);
      else w.page(name, p * PS, data, p * PS);
      if (p % 16 === 15) w.endSection();
    }
    w.endRam();
    w.flush();
    return { bytes: Buffer.concat(parts), buffers };
  };
  const given = run(false);
  const lent = run(true);
  assert.ok(lent.bytes.equals(given.bytes));
  assert.is(lent.buffers.size, 1, 'one buffer for every chunk');
  assert.ok(given.buffers.size > 1);
});

test('a gathering writer lends out the pages and its segments make the same bytes as copying', () => {
  const name = ramBlockName('pc.ram');
  const acpi = ramBlockName('/rom@etc/acpi/tables');
  // 20 distinct data buffers (more than the 16 one gathered write takes)
  // and 1200 pages (more than its 1024 segments).
  const datas = Array.from({ length: 20 }, (_, i) => randomBytes(60 * PS, 100 + i));
  const big = randomBytes(3 << 20, 99);
  const script = (w: RamRecordWriter): void => {
    w.raw(Buffer.from([1, 2, 3]));
    for (let p = 0; p < 1200; p++) {
      w.beginSection();
      const data = datas[Math.floor(p / 60)];
      if (p % 9 === 0) w.zero(name, p * PS);
      else w.page(p % 50 === 7 ? acpi : name, p * PS, data, (p % 60) * PS);
      if (p % 300 === 299) w.endSection();
      if (p === 600) w.raw(big); // larger than the record buffer
    }
    w.endRam();
    w.flush();
  };
  const copied: Buffer[] = [];
  script(new RamRecordWriter(2, PS, (chunk) => copied.push(Buffer.from(chunk)), 64 << 10, false));
  const gathered: Buffer[] = [];
  let batches = 0;
  let lentPages = 0;
  let sumBytes = 0;
  const own = new Set<Buffer>();
  script(
    new RamRecordWriter(2, PS, (chunk) => gathered.push(Buffer.from(chunk)), 64 << 10, false, (buffers, segs, count, bytes) => {
      batches++;
      assert.ok(count <= 1024 && buffers.length <= 16, `${count} segments over ${buffers.length} buffers`);
      own.add(buffers[0]);
      let n = 0;
      for (let i = 0; i < count; i++) {
        const [b, off, len] = [segs[i * 3], segs[i * 3 + 1], segs[i * 3 + 2]];
        if (b !== 0) {
          assert.ok(datas.includes(buffers[b]), 'page data by reference');
          lentPages++;
        }
        gathered.push(Buffer.from(buffers[b].subarray(off, off + len)));
        n += len;
      }
      assert.is(n, bytes);
      sumBytes += bytes;
    }),
  );
  const a = Buffer.concat(copied);
  const b = Buffer.concat(gathered);
  assert.is(b.length, a.length);
  assert.ok(b.equals(a), 'same stream');
  assert.is(lentPages, 1200 - 134, 'every data page lent, none copied');
  assert.ok(batches > 2, `${batches} gathered writes`);
  assert.is(sumBytes, a.length - big.length, 'the large raw write went to emit()');
  assert.is(own.size, 1, 'one header buffer, reused');
});

test.run();
