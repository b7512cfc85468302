// The CLI through real pipes, as QEMU's exec: runs it. Node's spawn gives a
// child socketpairs for 'pipe' stdio, which take other code paths (FdReader,
// FdWriter and DirectLoadPump only run on a FIFO): here stdin and stdout
// are pipes made from FIFOs, with the native module on and off. Signals end
// a save whose source went quiet and a load whose reader stalls, promptly.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import { requireQemu } from './lib';
import { CLI, tempDir, isOneLineError } from './common';
import { fifoPair } from '../helpers';
import { captureStream } from '../../bench/mutate';

const dir = tempDir('pipes');
const stream = path.join(dir, 'vm.stream');
const image = path.join(dir, 'vm.qcow2');
let expectedLoad: Buffer;

test.before(async () => {
  requireQemu();
  // 12 MiB of random guest RAM: many times a 1 MiB pipe.
  await captureStream(stream, 64, 12, 11);
  const r = spawnSync(process.execPath, [CLI, 'save', '-q', '--input', stream, image]);
  assert.is(r.status, 0, r.stderr?.toString());
  const out = path.join(dir, 'expected.load');
  const l = spawnSync(process.execPath, [CLI, 'load', '-q', '-o', out, image]);
  assert.is(l.status, 0, l.stderr?.toString());
  expectedLoad = fs.readFileSync(out);
  fs.rmSync(out);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function pipePair(): [number, number] {
  return fifoPair(dir);
}

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  ms: number;
}

/** Starts the CLI with `stdin`/`stdout` fds (the child's ends; closed here after the spawn). */
function start(args: string[], stdin: number | 'ignore', stdout: number | 'ignore', native: boolean): { child: ChildProcess; done: Promise<Exit> } {
  const t0 = Date.now();
  const env = { ...process.env, QEMU_SNAP_NATIVE: native ? '1' : '0' };
  const child = spawn(process.execPath, [CLI, ...args], { stdio: [stdin, stdout, 'pipe'], env });
  if (typeof stdin === 'number') fs.closeSync(stdin);
  if (typeof stdout === 'number') fs.closeSync(stdout);
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => (stderr += s));
  const done = new Promise<Exit>((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr, ms: Date.now() - t0 });
    });
  });
  return { child, done };
}

/** Writes `data` to a blocking fd from the thread pool. */
async function writeAll(fd: number, data: Buffer): Promise<void> {
  let at = 0;
  while (at < data.length) {
    const n = await new Promise<number>((resolve, reject) => fs.write(fd, data, at, Math.min(1 << 20, data.length - at), null, (err, w) => (err ? reject(err) : resolve(w))));
    at += n;
  }
}

/** Reads a blocking fd to EOF from the thread pool. */
async function readAll(fd: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (;;) {
    const buf = Buffer.allocUnsafe(1 << 20);
    const n = await new Promise<number>((resolve, reject) => fs.read(fd, buf, 0, buf.length, null, (err, r) => (err ? reject(err) : resolve(r))));
    if (n === 0) return Buffer.concat(parts);
    parts.push(buf.subarray(0, n));
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function assertInterrupted(e: Exit, sig: string, signalledAt: number): void {
  assert.is(e.signal, null, `killed by ${e.signal}`);
  assert.is(e.code, 1, e.stderr);
  assert.ok(isOneLineError(e.stderr), JSON.stringify(e.stderr));
  assert.match(e.stderr, new RegExp(`interrupted \\(${sig}\\)`));
  const after = Date.now() - signalledAt;
  process.stdout.write(`  exit ${after} ms after ${sig}\n`);
  // The promise is 1 s; the margin is for a loaded machine.
  assert.ok(after < 2000, `exited ${after} ms after ${sig}`);
}

for (const native of [true, false]) {
  const mode = native ? 'native' : 'QEMU_SNAP_NATIVE=0';

  test(`[${mode}] save from a pipe: the same image as from --input`, async () => {
    const sub = tempDir('pipes-save');
    try {
      const [r, w] = pipePair();
      const target = path.join(sub, 'vm.qcow2');
      const { done } = start(['save', '-q', target], r, 'ignore', native);
      await writeAll(w, fs.readFileSync(stream));
      fs.closeSync(w);
      const e = await done;
      assert.is(e.code, 0, e.stderr);
      assert.equal(fs.readdirSync(sub), ['vm.qcow2']);
      const out = path.join(sub, 'out');
      const l = spawnSync(process.execPath, [CLI, 'load', '-q', '-o', out, target]);
      assert.is(l.status, 0, l.stderr?.toString());
      assert.ok(fs.readFileSync(out).equals(expectedLoad), 'the image loads to the same stream');
    } finally {
      fs.rmSync(sub, { recursive: true, force: true });
    }
  });

  test(`[${mode}] load to a pipe: the same bytes as --output`, async () => {
    const [r, w] = pipePair();
    const { done } = start(['load', '-q', image], 'ignore', w, native);
    const got = await readAll(r);
    fs.closeSync(r);
    const e = await done;
    assert.is(e.code, 0, e.stderr);
    assert.is(got.length, expectedLoad.length);
    assert.ok(got.equals(expectedLoad), 'same stream');
  });

  test(`[${mode}] SIGTERM to a save whose input pipe went idle: exit 1 within 2 s, no file left`, async () => {
    const sub = tempDir('pipes-idle');
    const [r, w] = pipePair();
    try {
      const { child, done } = start(['save', '-q', path.join(sub, 'vm.qcow2')], r, 'ignore', native);
      const data = fs.readFileSync(stream);
      // Half the stream, then nothing, the write end held open.
      await writeAll(w, data.subarray(0, data.length >> 1));
      await sleep(700);
      const t0 = Date.now();
      child.kill('SIGTERM');
      const e = await done;
      assertInterrupted(e, 'SIGTERM', t0);
      assert.equal(fs.readdirSync(sub), [], 'no file left behind');
    } finally {
      fs.closeSync(w);
      fs.rmSync(sub, { recursive: true, force: true });
    }
  });

  test(`[${mode}] SIGTERM to a postcopy load waiting on its return path: exit 1 within 2 s`, async () => {
    const [inR, inW] = pipePair();
    const [outR, outW] = pipePair();
    try {
      // The return path stays open and silent; the stream is read and dropped.
      const { child, done } = start(['load', '-q', '--postcopy', '0', image], inR, outW, native);
      const drained = readAll(outR);
      await sleep(1000);
      const t0 = Date.now();
      child.kill('SIGTERM');
      const e = await done;
      assertInterrupted(e, 'SIGTERM', t0);
      await drained;
    } finally {
      fs.closeSync(inW);
      fs.closeSync(outR);
    }
  });

  test(`[${mode}] SIGINT to a load whose output pipe is full: exit 1 within 2 s`, async () => {
    const [r, w] = pipePair();
    try {
      const { child, done } = start(['load', '-q', image], 'ignore', w, native);
      // Read nothing: the load fills the pipe and waits for the reader.
      await sleep(1000);
      const t0 = Date.now();
      child.kill('SIGINT');
      const e = await done;
      assertInterrupted(e, 'SIGINT', t0);
    } finally {
      fs.closeSync(r);
    }
  });

  test(`[${mode}] SIGINT to info reading a pipe that went idle: exit 1 within 2 s`, async () => {
    const [r, w] = pipePair();
    try {
      const { child, done } = start(['info', '-'], r, 'ignore', native);
      // Half a stream, then the writer holds the pipe open and sends nothing.
      await writeAll(w, fs.readFileSync(stream).subarray(0, 1 << 20));
      await sleep(1000);
      const t0 = Date.now();
      child.kill('SIGINT');
      assertInterrupted(await done, 'SIGINT', t0);
    } finally {
      fs.closeSync(w);
    }
  });

  test(`[${mode}] load -o FIFO: SIGTERM while no reader opened it ends it within 2 s; a late reader gets the whole stream`, async () => {
    const fifo = path.join(dir, `out-fifo-${native ? 'native' : 'js'}`);
    assert.is(spawnSync('mkfifo', [fifo]).status, 0, 'mkfifo');
    try {
      const first = start(['load', '-q', '-o', fifo, image], 'ignore', 'ignore', native);
      await sleep(1000);
      const t0 = Date.now();
      first.child.kill('SIGTERM');
      assertInterrupted(await first.done, 'SIGTERM', t0);
      // The reader comes a second after the load started waiting for it.
      const second = start(['load', '-q', '-o', fifo, image], 'ignore', 'ignore', native);
      await sleep(1000);
      const r = await new Promise<number>((resolve, reject) => fs.open(fifo, 'r', (err, fd) => (err ? reject(err) : resolve(fd))));
      const got = await readAll(r);
      fs.closeSync(r);
      const e = await second.done;
      assert.is(e.code, 0, e.stderr);
      assert.ok(got.equals(expectedLoad), `the FIFO got ${got.length} bytes, the same as --output to a file`);
    } finally {
      fs.rmSync(fifo, { force: true });
    }
  });
}

test.run();
