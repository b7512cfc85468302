// Issue 5 against real QEMU: save a VM through exec:qemu-snap save, restore
// it with -incoming "exec:qemu-snap load IMAGE", compare guest memory.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { startVm, makePattern, requireQemu, shellQuote, Machine, QEMU_IMG } from './lib';
import { runCli, snapExec, tempDir, isOneLineError, memoryDifference } from './common';
import { isRefusalNotice } from '../../src/snapshot/refusal';

const MEM_MIB = 512;
const dir = tempDir('load');
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, 128 << 20, 23);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

async function roundTrip(machine: Machine, paused: boolean): Promise<void> {
  const tag = `${machine}-${paused ? 'paused' : 'running'}`;
  const image = path.join(dir, `${tag}.qcow2`);
  const srcDump = path.join(dir, `${tag}.src.mem`);
  const dstDump = path.join(dir, `${tag}.dst.mem`);
  const src = await startVm({ machine, memMiB: MEM_MIB, paused, loads: [{ file: pattern, addr: 128 << 20 }], name: `${tag}-src` });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(image)}`));
    await src.pmemsave(srcDump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
  // -S: a restored guest that runs at once changes its memory before the dump.
  const dst = await startVm({ machine, memMiB: MEM_MIB, paused: true, incoming: snapExec(`load -q ${shellQuote(image)}`), name: `${tag}-dst` });
  try {
    const done = await dst.waitForMigrationStatus('completed', 60_000);
    assert.is(done.status, 'completed');
    await dst.pmemsave(dstDump, MEM_MIB << 20);
    if (!paused) {
      await dst.cont();
      assert.is((await dst.queryStatus()).status, 'running', 'the restored VM runs');
    }
  } finally {
    await dst.stop();
  }
  assert.is(memoryDifference(srcDump, dstDump, !paused), null, 'destination memory equals the source');
  for (const f of [image, srcDump, dstDump]) fs.unlinkSync(f);
}

test('pc, paused: restored memory is byte-identical', () => roundTrip('pc', true));
test('q35, paused', () => roundTrip('q35', true));
test('pc, running: the VM runs after restore', () => roundTrip('pc', false));

test('a restored running VM starts by itself without -S', async () => {
  const image = path.join(dir, 'autostart.qcow2');
  const src = await startVm({ machine: 'pc', memMiB: 256, paused: false });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(image)}`));
  } finally {
    await src.stop();
  }
  const dst = await startVm({ machine: 'pc', memMiB: 256, paused: false, incoming: snapExec(`load -q ${shellQuote(image)}`) });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    assert.is((await dst.queryStatus()).status, 'running');
  } finally {
    await dst.stop();
  }
});

test('load --output writes the same stream a destination accepts; info reads it', async () => {
  const image = path.join(dir, 'out.qcow2');
  const stream = path.join(dir, 'out.stream');
  const vm = await startVm({ machine: 'pc', memMiB: 128, loads: [{ file: pattern, addr: 16 << 20 }] });
  let normal = 0;
  try {
    normal = (await vm.migrate(snapExec(`save -q ${shellQuote(image)}`))).ram?.normal ?? -1;
  } finally {
    await vm.stop();
  }
  const r = await runCli(['load', '-q', '--output', stream, image]);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout.length, 0, 'nothing on stdout with --output');
  const info = JSON.parse((await runCli(['info', '--json', stream])).stdout.toString());
  assert.is(info.pages.normal, normal, 'every data page once');
  const snap = JSON.parse((await runCli(['info', '--json', image])).stdout.toString());
  const totalPages = snap.ramBlocks.reduce((n: number, b: { length: number }) => n + Math.ceil(b.length / 4096), 0);
  assert.is(info.pages.normal + info.pages.zero, totalPages, 'every page exactly once');

  // The native module's paths (mapped reads, gathered writes, its XXH64)
  // give the bytes the pure-JS ones give.
  const expected = fs.readFileSync(stream);
  const noNative = { QEMU_SNAP_NATIVE: '0' };
  const jsStream = path.join(dir, 'out-js.stream');
  assert.is((await runCli(['load', '-q', '--output', jsStream, image], { env: noNative })).code, 0);
  assert.ok(fs.readFileSync(jsStream).equals(expected), 'load --output without the native module');
  const piped = await runCli(['load', '-q', image]);
  assert.is(piped.code, 0, piped.stderr);
  assert.ok(piped.stdout.equals(expected), 'load to a pipe');
  const jsPiped = await runCli(['load', '-q', image], { env: noNative });
  assert.ok(jsPiped.stdout.equals(expected), 'load to a pipe without the native module');
  // Saved without the native module, checked with it, and the other way round.
  const jsImage = path.join(dir, 'out-js.qcow2');
  assert.is((await runCli(['save', '-q', '-i', stream, jsImage], { env: noNative })).code, 0);
  const v1 = await runCli(['verify', jsImage]);
  assert.is(v1.code, 0, v1.stderr);
  const v2 = await runCli(['verify', image], { env: noNative });
  assert.is(v2.code, 0, v2.stderr);
  const again = await runCli(['load', '-q', jsImage]);
  assert.ok(again.stdout.equals(expected), 'the image saved without the native module loads to the same stream');
  for (const f of [jsStream, jsImage]) fs.unlinkSync(f);
});

test('bad images: exit 1, one line, nothing on stdout but the refusal notice', async () => {
  const notQcow = path.join(dir, 'not.qcow2');
  fs.writeFileSync(notQcow, Buffer.alloc(4096, 0x41));
  const plain = path.join(dir, 'plain.qcow2');
  execFileSync(QEMU_IMG, ['create', '-q', '-f', 'qcow2', plain, '64M']);
  const missing = path.join(dir, 'missing.qcow2');
  for (const img of [notQcow, plain, missing]) {
    const r = await runCli(['load', img]);
    assert.is(r.code, 1, `${img}: ${r.stderr}`);
    assert.ok(isRefusalNotice(r.stdout), 'a consumer (here a socket) gets the refusal notice and nothing else');
    assert.ok(isOneLineError(r.stderr), r.stderr);
  }
  const image = path.join(dir, 'ps.qcow2');
  const vm = await startVm({ machine: 'pc', memMiB: 64 });
  try {
    await vm.migrate(snapExec(`save -q ${shellQuote(image)}`));
  } finally {
    await vm.stop();
  }
  const wrongPs = await runCli(['load', '-S', '64K', image]);
  assert.is(wrongPs.code, 1);
  assert.ok(isRefusalNotice(wrongPs.stdout));
  assert.match(wrongPs.stderr, /page/);
  const usage = await runCli(['load', '--bogus', image]);
  assert.is(usage.code, 2);
});

test('a destination that closes the pipe: exit 1 with a clear line', async () => {
  const image = path.join(dir, 'epipe.qcow2');
  const vm = await startVm({ machine: 'pc', memMiB: 256, loads: [{ file: pattern, addr: 16 << 20 }] });
  try {
    await vm.migrate(snapExec(`save -q ${shellQuote(image)}`));
  } finally {
    await vm.stop();
  }
  const out = execFileSync('bash', ['-c', `${shellQuote(process.execPath)} ${shellQuote(path.resolve(__dirname, '..', '..', 'cli', 'qemu-snap.js'))} load -q ${shellQuote(image)} 2>${shellQuote(path.join(dir, 'err.txt'))} | head -c 100000 > /dev/null; echo "\${PIPESTATUS[0]}"`], { encoding: 'utf8' });
  assert.is(out.trim(), '1');
  const err = fs.readFileSync(path.join(dir, 'err.txt'), 'utf8');
  assert.ok(isOneLineError(err), err);
  assert.match(err, /pipe/i);
});

test.run();
