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
      // Let the image be written (unnamed: nothing to see in the directory), then interrupt.
      await sleep(500);
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

/** Starts a save of the stream through stdin and SIGKILLs it once it has written part of its image. */
async function killedSave(target: string, env: NodeJS.ProcessEnv = {}): Promise<void> {
  const child = spawn(process.execPath, [CLI, 'save', '-q', target], { stdio: ['pipe', 'ignore', 'ignore'], env: { ...process.env, ...env } });
  child.stdin.on('error', () => undefined);
  const closed = new Promise((resolve) => child.on('close', resolve));
  await new Promise<void>((resolve) => child.stdin.write(fs.readFileSync(stream).subarray(0, 6 << 20), () => resolve()));
  await sleep(500);
  child.kill('SIGKILL');
  await closed;
}

test('SIGKILL in the middle of a save: the directory is as it was (unnamed temporary file)', async () => {
  const sub = tempDir('faults-kill');
  try {
    fs.writeFileSync(path.join(sub, 'other'), 'x');
    await killedSave(path.join(sub, 'vm.qcow2'));
    assert.equal(fs.readdirSync(sub), ['other']);
    // and replacing an image: the old one stays, whole
    fs.copyFileSync(image, path.join(sub, 'vm.qcow2'));
    const child = spawn(process.execPath, [CLI, 'save', '-q', '-f', path.join(sub, 'vm.qcow2')], { stdio: ['pipe', 'ignore', 'ignore'] });
    child.stdin.on('error', () => undefined);
    const closed = new Promise((resolve) => child.on('close', resolve));
    child.stdin.write(fs.readFileSync(stream).subarray(0, 6 << 20));
    await sleep(500);
    child.kill('SIGKILL');
    await closed;
    assert.equal(fs.readdirSync(sub).sort(), ['other', 'vm.qcow2']);
    assert.ok(fs.readFileSync(path.join(sub, 'vm.qcow2')).equals(fs.readFileSync(image)), 'the old image is untouched');
  } finally {
    fs.rmSync(sub, { recursive: true, force: true });
  }
});

test('SIGKILL in the middle of a save with named temporaries (QEMU_SNAP_TMPFILE=0): the next save removes the stale one', async () => {
  const sub = tempDir('faults-stale');
  try {
    await killedSave(path.join(sub, 'vm.qcow2'), { QEMU_SNAP_TMPFILE: '0' });
    const left = fs.readdirSync(sub);
    assert.is(left.length, 1, 'the killed save left its named temporary');
    assert.match(left[0], /^\.vm\.qcow2\.\d+\.[0-9a-f]{8}\.tmp$/);
    // Older than the 10 s a live save's temporary is given.
    const old = new Date(Date.now() - 60_000);
    fs.utimesSync(path.join(sub, left[0]), old, old);
    const r = spawnSync(process.execPath, [CLI, 'save', '-q', '--input', stream, path.join(sub, 'b.qcow2')], { env: { ...process.env, QEMU_SNAP_TMPFILE: '0' } });
    assert.is(r.status, 0, r.stderr?.toString());
    assert.equal(fs.readdirSync(sub), ['b.qcow2']);
  } finally {
    fs.rmSync(sub, { recursive: true, force: true });
  }
});

test('save into a missing directory names that directory as typed', () => {
  const r = spawnSync(process.execPath, [CLI, 'save', '--input', stream, '/nonexistent-qemu-snap/nodir/vm.qcow2'], { encoding: 'utf8' });
  assert.is(r.status, 1);
  assert.is(r.stderr, 'qemu-snap: /nonexistent-qemu-snap/nodir: no such directory (for IMAGE /nonexistent-qemu-snap/nodir/vm.qcow2)\n');
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
