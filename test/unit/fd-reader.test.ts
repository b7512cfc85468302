// FdReader through real pipes (FIFO pairs, as QEMU's exec: gives): a
// writer of small pieces still yields full chunks when the reader thread
// may wait for the next piece, a tail the writer leaves without closing is
// handed over within the wait, and the bytes are the writer's in every
// setting. Also the native waitReadable it waits with.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { FdReader } from '../../src/util/fd-reader';
import { native, nativeUnavailableReason } from '../../src/util/native';
import { fifoPair, prng } from '../helpers';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-fdreader-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function randomFile(bytes: number, seed: number): string {
  const r = prng(seed);
  const b = Buffer.allocUnsafe(bytes);
  for (let i = 0; i < bytes; i += 4) b.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
  const f = path.join(dir, `data${seed}`);
  fs.writeFileSync(f, b);
  return f;
}

const CHUNK = 512 << 10;

/** Reads `fd` to EOF through an FdReader; the chunk lengths and the bytes. */
function readAll(fd: number, dryWaitMs: number): Promise<{ lengths: number[]; bytes: Buffer }> {
  // As the CLI sees a pipe it grew to 1 MiB: any shorter read found it dry.
  const reader = new FdReader(fd, { chunkSize: CHUNK, dryWaitMs, pipeSize: 1 << 20 });
  const parts: Buffer[] = [];
  return new Promise((resolve, reject) => {
    reader.on('data', (b: unknown) => {
      parts.push(Buffer.from(b as Buffer));
    });
    reader.on('error', reject);
    reader.on('end', () => {
      fs.closeSync(fd);
      resolve({ lengths: parts.map((p) => p.length), bytes: Buffer.concat(parts) });
    });
  });
}

/** dd writing `file` into the pipe's write end in 48 KiB pieces. */
function ddInto(w: number, file: string): Promise<void> {
  const child = spawn('dd', [`if=${file}`, 'bs=48k', 'status=none'], { stdio: ['ignore', w, 'inherit'] });
  fs.closeSync(w);
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`dd exited with ${code}`))));
  });
}

test('waitReadable: false on an empty pipe after the timeout, true once a byte is in it', () => {
  const m = native();
  assert.ok(m?.waitReadable, `native waitReadable: ${nativeUnavailableReason() || 'absent from this build'}`);
  const [r, w] = fifoPair(dir);
  const t0 = performance.now();
  assert.is(m.waitReadable(r, 30), false);
  const waited = performance.now() - t0;
  assert.ok(waited >= 25 && waited < 1000, `waited ${waited.toFixed(1)} ms for a 30 ms timeout`);
  fs.writeSync(w, Buffer.from('x'));
  assert.is(m.waitReadable(r, 1000), true);
  fs.closeSync(w);
  fs.readSync(r, Buffer.alloc(1));
  // A hang-up is readable too: the next read reports the end.
  assert.is(m.waitReadable(r, 1000), true);
  fs.closeSync(r);
});

test('a writer of 48 KiB pieces: with a dry wait the chunks go out full, and the bytes are the writer\'s', async () => {
  assert.ok(native()?.waitReadable, 'native waitReadable');
  const file = randomFile(16 << 20, 7);
  const [r, w] = fifoPair(dir);
  // A generous wait: this checks the mechanism, not the 1 ms default, on a
  // machine that may be busy with other tests.
  const [got] = await Promise.all([readAll(r, 50), ddInto(w, file)]);
  assert.ok(got.bytes.equals(fs.readFileSync(file)), 'the bytes read are the bytes written');
  const full = got.lengths.filter((n) => n === CHUNK).length;
  // 32 full chunks hold the 16 MiB. Handing over each part-filled chunk at
  // once (dryWaitMs 0) sends hundreds of pieces of at most 64 KiB (what the
  // FIFO holds) and no full chunk.
  assert.ok(full >= 24, `${full} full chunks of ${got.lengths.length} (expected most of 32)`);
});

test('the same writer without a dry wait: the same bytes', async () => {
  const file = randomFile(4 << 20, 8);
  const [r, w] = fifoPair(dir);
  const [got] = await Promise.all([readAll(r, 0), ddInto(w, file)]);
  assert.ok(got.bytes.equals(fs.readFileSync(file)));
});

test('a tail the writer leaves without closing is handed over within the dry wait', async () => {
  const [r, w] = fifoPair(dir);
  const reader = new FdReader(r, { chunkSize: CHUNK, dryWaitMs: 50 });
  let received = 0;
  const arrived = new Promise<number>((resolve) => {
    const t0 = performance.now();
    reader.on('data', (b: unknown) => {
      received += (b as Buffer).length;
      if (received === 40_000) resolve(performance.now() - t0);
    });
  });
  await reader.started;
  fs.writeSync(w, Buffer.alloc(40_000, 1));
  const ms = await Promise.race([arrived, new Promise<number>((resolve) => setTimeout(() => resolve(-1), 3000))]);
  assert.ok(ms >= 0, `only ${received} of 40000 bytes arrived in 3 s with the writer still open`);
  assert.ok(ms < 1000, `the tail took ${ms.toFixed(0)} ms`);
  reader.destroy();
  // The reader thread, woken by destroy(), lets go of the pipe first.
  await new Promise((resolve) => setTimeout(resolve, 50));
  fs.closeSync(w);
  fs.closeSync(r);
});

test.run();
