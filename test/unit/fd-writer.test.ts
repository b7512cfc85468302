// FdWriter on a full non-blocking pipe: a synchronous write returns within
// its wait bound, keeping the rest aside; flushPending writes it once the
// reader reads, in order, and is cancelled when the reader never does.
// Runs with the native module as loaded, then again in a child with
// QEMU_SNAP_NATIVE=0 for the pure-JS path.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { FdWriter, SYNC_WAIT_MS } from '../../src/util/fd-writer';
import { native } from '../../src/util/native';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-fdw-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;

/** A FIFO's two ends: [read fd (blocking; O_RDWR so that the open does not wait), write fd (non-blocking)]. */
function pipePair(): [number, number] {
  const f = path.join(dir, `p${n++}`);
  assert.is(spawnSync('mkfifo', [f]).status, 0);
  const r = fs.openSync(f, fs.constants.O_RDWR);
  const w = fs.openSync(f, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  fs.rmSync(f);
  return [r, w];
}

function data(bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 4) b.writeUInt32LE(i, i);
  return b;
}

const mode = native() ? 'native' : 'pure JS';

test(`[${mode}] a write to a full pipe returns within its bound; flushPending writes the rest in order`, async () => {
  const [r, w] = pipePair();
  const writer = new FdWriter(w);
  const d = data(4 << 20);
  const t0 = Date.now();
  writer.writeSync(d.subarray(0, 2 << 20));
  writer.writeSync(d.subarray(2 << 20));
  const ms = Date.now() - t0;
  assert.ok(ms < SYNC_WAIT_MS * 2 + 200, `writeSync took ${ms} ms`);
  assert.ok(writer.pendingBytes > 0, 'kept aside');
  assert.is(writer.bytesWritten + writer.pendingBytes, d.length);
  const flushed = writer.flushPending();
  assert.ok(flushed);
  // The reader: another process, reading exactly what was written.
  const reader = spawn('head', ['-c', String(d.length)], { stdio: [r, 'pipe', 'ignore'] });
  const got: Buffer[] = [];
  reader.stdout?.on('data', (b: Buffer) => got.push(b));
  const closed = new Promise((resolve) => reader.on('close', resolve));
  await flushed;
  await closed;
  assert.is(writer.pendingBytes, 0);
  assert.ok(Buffer.concat(got).equals(d), 'same bytes, in order');
  fs.closeSync(r);
  fs.closeSync(w);
});

test(`[${mode}] flushPending is cancelled while the reader stalls`, async () => {
  const [r, w] = pipePair();
  const writer = new FdWriter(w);
  writer.writeSync(data(1 << 20));
  const flushed = writer.flushPending();
  assert.ok(flushed);
  const t0 = Date.now();
  setTimeout(() => writer.cancel(new Error('interrupted')), 100);
  try {
    await flushed;
    assert.unreachable('flushPending resolved with nobody reading');
  } catch (err) {
    assert.is((err as Error).message, 'interrupted');
  }
  assert.ok(Date.now() - t0 < 100 + SYNC_WAIT_MS + 500, `cancelled after ${Date.now() - t0} ms`);
  fs.closeSync(r);
  fs.closeSync(w);
});

if (native() && process.env.QEMU_SNAP_NATIVE !== '0') {
  test('the same without the native module (child process)', () => {
    const c = spawnSync(process.execPath, [__filename], { env: { ...process.env, QEMU_SNAP_NATIVE: '0' }, encoding: 'utf8' });
    assert.is(c.status, 0, c.stdout + c.stderr);
  });
}

test.run();
