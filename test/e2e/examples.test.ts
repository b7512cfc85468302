// The library composes as the README says: the programs under examples/
// (built to dist/examples/) run against real QEMU.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { spawn, execFileSync } from 'node:child_process';
import { startVm, requireQemu, makePattern, shellQuote, compareRange, QEMU_IMG, withSnapQmp } from './lib';
import { runCli, tempDir } from './common';

const EXAMPLES = path.resolve(__dirname, '..', '..', 'examples');
const dir = tempDir('examples');
const MEM_MIB = 256;
const PAT_ADDR = 32 << 20;
const PAT_SIZE = 64 << 20;
const pattern = path.join(dir, 'pattern.bin');
const stream = path.join(dir, 'vm.stream');
const reference = path.join(dir, 'reference.qcow2');
let normalPages = 0;

interface Run {
  code: number | null;
  stderr: string;
}

function runExample(name: string, args: string[], opts: { timeoutMs?: number; onStderr?: (text: string) => void } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(EXAMPLES, `${name}.js`), ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      err += s;
      opts.onStderr?.(err);
    });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`example ${name} hung; stderr: ${err}`));
    }, opts.timeoutMs ?? 60_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr: err });
    });
  });
}

/** The precopy stream `load` makes of an image: two images with the same stream hold the same snapshot. */
async function loadBytes(image: string): Promise<Buffer> {
  const out = `${image}.out`;
  const r = await runCli(['load', '-q', '-o', out, image]);
  assert.is(r.code, 0, r.stderr);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

test.before(async () => {
  requireQemu();
  makePattern(pattern, PAT_SIZE, 77);
  const vm = await startVm({ memMiB: MEM_MIB, loads: [{ file: pattern, addr: PAT_ADDR }], name: 'examples-src' });
  try {
    const info = await vm.migrate(`exec:cat > ${shellQuote(stream)}`);
    normalPages = info.ram?.normal ?? -1;
  } finally {
    await vm.stop();
  }
  const r = await runCli(['save', '-q', '-i', stream, reference]);
  assert.is(r.code, 0, r.stderr);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('compose-save: MigrationFramer → SnapshotWriter → OrderedBlockWriter(ImageBlockTarget) → finishSnapshotImage', async () => {
  const image = path.join(dir, 'composed.qcow2');
  const r = await runExample('compose-save', [stream, image]);
  assert.is(r.code, 0, r.stderr);
  execFileSync(QEMU_IMG, ['check', image]);
  const info = await runCli(['info', '--json', image]);
  assert.is(info.code, 0, info.stderr);
  assert.is(JSON.parse(info.stdout.toString()).pages.normal, normalPages);
  assert.ok((await loadBytes(image)).equals(await loadBytes(reference)), 'the composed image loads the same stream as qemu-snap save');
});

test('zstd-socket-save: a zstd-compressed stream over a unix socket', async () => {
  const zst = path.join(dir, 'vm.stream.zst');
  execFileSync('zstd', ['-q', '-f', '-o', zst, stream]);
  const sock = path.join(dir, 'zstd.sock');
  const image = path.join(dir, 'zstd.qcow2');
  let sent = false;
  const r = await runExample('zstd-socket-save', [sock, image], {
    onStderr: (text) => {
      if (sent || !text.includes('listening')) return;
      sent = true;
      const c = net.connect(sock, () => fs.createReadStream(zst).pipe(c));
    },
  });
  assert.is(r.code, 0, r.stderr);
  assert.ok((await loadBytes(image)).equals(await loadBytes(reference)));
});

test('load-to-socket: createLoadStream piped into a QEMU listening with -incoming unix:', async () => {
  const sock = path.join(dir, 'incoming.sock');
  const dst = await startVm({ memMiB: MEM_MIB, incoming: `unix:${sock}`, name: 'examples-dst' });
  try {
    const r = await runExample('load-to-socket', [reference, sock]);
    assert.is(r.code, 0, r.stderr);
    await dst.waitForMigrationStatus('completed', 60_000);
    const dump = path.join(dir, 'dst.mem');
    await dst.pmemsave(dump, PAT_SIZE, PAT_ADDR);
    assert.is(compareRange(dump, 0, fs.readFileSync(pattern)), -1);
  } finally {
    await dst.stop();
  }
});

test('qmp-save: saveViaQmp and restoreViaQmp from code', async () => {
  const sock = path.join(dir, 'src-snap.sock');
  const dsock = path.join(dir, 'dst-snap.sock');
  const image = path.join(dir, 'qmp.qcow2');
  const src = await startVm(withSnapQmp({ memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: PAT_ADDR }], name: 'examples-qmp-src' }, sock));
  const dst = await startVm(withSnapQmp({ memMiB: MEM_MIB, paused: true, incoming: 'defer', name: 'examples-qmp-dst' }, dsock));
  try {
    const r = await runExample('qmp-save', [sock, image, dsock]);
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stderr, /QEMU migration completed/);
    assert.is((await src.queryStatus()).status, 'running');
    assert.is((await dst.queryStatus()).status, 'running');
    const dump = path.join(dir, 'qmp-dst.mem');
    await dst.pmemsave(dump, PAT_SIZE, PAT_ADDR);
    assert.is(compareRange(dump, 0, fs.readFileSync(pattern)), -1);
  } finally {
    await src.stop();
    await dst.stop();
  }
});

test.run();
