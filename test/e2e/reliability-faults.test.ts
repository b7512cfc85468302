// Faults around the real CLI: a full disk, signals in the middle of a save
// and a load, a reader that goes away (EPIPE), a return path that closes
// during a postcopy load, and two saves racing for one image. Each must end
// promptly with exit 1 and one line, and leave no file behind.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync, ChildProcessWithoutNullStreams } from 'node:child_process';
import { requireQemu } from './lib';
import { CLI, tempDir, isOneLineError } from './common';
import { captureStream, qemuImgCheck } from '../../bench/mutate';

const dir = tempDir('faults');
const stream = path.join(dir, 'vm.stream');
const image = path.join(dir, 'vm.qcow2');

test.before(async () => {
  requireQemu();
  // 12 MiB of random guest RAM: more than the 8 MiB disk of the full-disk case.
  await captureStream(stream, 64, 12, 5);
  const r = spawnSync(process.execPath, [CLI, 'save', '-q', '--input', stream, image]);
  assert.is(r.status, 0, r.stderr?.toString());
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  stdoutBytes: number;
  ms: number;
}

function start(args: string[]): { child: ChildProcessWithoutNullStreams; done: Promise<Exit> } {
  const t0 = Date.now();
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  let stdoutBytes = 0;
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (stderr += s));
  child.stdout.on('data', (b: Buffer) => (stdoutBytes += b.length));
  child.stdin.on('error', () => undefined);
  child.stdout.on('error', () => undefined);
  const done = new Promise<Exit>((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr, stdoutBytes, ms: Date.now() - t0 });
    });
  });
  return { child, done };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function assertCleanFailure(e: Exit, pattern?: RegExp): void {
  assert.is(e.signal, null, `killed by ${e.signal}`);
  assert.is(e.code, 1, e.stderr);
  assert.ok(isOneLineError(e.stderr), e.stderr);
  assert.not.match(e.stderr, /internal error/);
  if (pattern) assert.match(e.stderr, pattern);
}

/** Feeds the first `bytes` of the stream, then keeps stdin open (a source gone quiet). */
async function feedPart(child: ChildProcessWithoutNullStreams, bytes: number): Promise<void> {
  const data = fs.readFileSync(stream).subarray(0, bytes);
  await new Promise<void>((resolve) => child.stdin.write(data, () => resolve()));
}

test('full disk during save: exit 1 naming the lack of space, nothing left', async () => {
  const mnt = path.join(dir, 'small');
  fs.mkdirSync(mnt);
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt], { encoding: 'utf8' });
  assert.is(m.status, 0, `mount tmpfs: ${m.stderr} (the full-disk case needs root)`);
  try {
    const { done } = start(['save', '-q', '--input', stream, path.join(mnt, 'vm.qcow2')]);
    const e = await done;
    assertCleanFailure(e, /no space|ENOSPC/i);
    assert.equal(fs.readdirSync(mnt), [], 'no file left on the full disk');
  } finally {
    spawnSync('umount', [mnt]);
  }
});

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  test(`${sig} in the middle of a save: exit 1 promptly, no file left`, async () => {
    const sub = tempDir('faults-sig');
    try {
      const { child, done } = start(['save', '-q', path.join(sub, 'vm.qcow2')]);
      await feedPart(child, 6 << 20);
      // Wait until the image is being written, then interrupt.
      for (let i = 0; i < 100 && fs.readdirSync(sub).length === 0; i++) await sleep(20);
      assert.is(fs.readdirSync(sub).length, 1, 'the temporary image exists before the signal');
      const t0 = Date.now();
      child.kill(sig);
      const e = await done;
      assertCleanFailure(e, new RegExp(`interrupted \\(${sig}\\)`));
      assert.ok(Date.now() - t0 < 3000, `exited ${Date.now() - t0} ms after ${sig}`);
      assert.equal(fs.readdirSync(sub), [], 'no file left behind');
    } finally {
      fs.rmSync(sub, { recursive: true, force: true });
    }
  });

  test(`${sig} during a load whose reader stalls: exit 1 promptly`, async () => {
    const { child, done } = start(['load', '-q', image]);
    // Read nothing: the load fills the pipe and waits.
    child.stdout.pause();
    await sleep(700);
    const t0 = Date.now();
    child.kill(sig);
    const e = await done;
    assertCleanFailure(e, new RegExp(`interrupted \\(${sig}\\)`));
    assert.ok(Date.now() - t0 < 3000, `exited ${Date.now() - t0} ms after ${sig}`);
  });
}

test('the reader closes the pipe during a load (EPIPE): exit 1 with a clear line', async () => {
  const { child, done } = start(['load', '-q', image]);
  await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
  child.stdout.destroy();
  const e = await done;
  assertCleanFailure(e, /closed the pipe|EPIPE/);
});

test('stdin (the return path) closes during a postcopy load: exit 1', async () => {
  const { child, done } = start(['load', '-q', '--postcopy', '0', image]);
  child.stdout.resume();
  await sleep(300);
  child.stdin.end();
  const e = await done;
  assertCleanFailure(e, /return path|postcopy/);
});

test('two saves to one image at once: one wins, the other fails clearly, no temp files', async () => {
  const sub = tempDir('faults-race');
  try {
    const target = path.join(sub, 'vm.qcow2');
    const a = start(['save', '-q', '--input', stream, target]);
    const b = start(['save', '-q', '--input', stream, target]);
    const [ea, eb] = await Promise.all([a.done, b.done]);
    const codes = [ea.code, eb.code].sort();
    assert.equal(codes, [0, 1], `exits ${ea.code}/${eb.code}: ${ea.stderr} ${eb.stderr}`);
    const loser = ea.code === 1 ? ea : eb;
    assertCleanFailure(loser, /already exists/);
    assert.equal(fs.readdirSync(sub), ['vm.qcow2'], 'only the image, no temporary files');
    assert.is(qemuImgCheck(target), null);
  } finally {
    fs.rmSync(sub, { recursive: true, force: true });
  }
});

test.run();
