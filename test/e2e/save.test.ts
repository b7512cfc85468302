// Issue 4 against real QEMU: migrate "exec:qemu-snap save IMAGE" to
// completion, then check the image with QEMU's own tools and with the guest's
// memory dump.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { startVm, makePattern, requireQemu, shellQuote, Machine, QEMU_IMG, Vm } from './lib';
import { runCli, snapExec, tempDir, isOneLineError } from './common';

const MEM_MIB = 512;
const dir = tempDir('save');
const pattern = path.join(dir, 'pattern.bin');
const PATTERN_ADDR = 64 << 20;
const PATTERN_SIZE = 64 << 20;

test.before(() => {
  requireQemu();
  makePattern(pattern, PATTERN_SIZE, 11);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

interface Saved {
  image: string;
  dump: string;
  normal: number;
}

async function saveVm(machine: Machine, paused: boolean, caps?: Record<string, boolean>): Promise<Saved> {
  const tag = `${machine}-${paused ? 'paused' : 'running'}${caps ? '-' + Object.keys(caps).join('-') : ''}`;
  const image = path.join(dir, `${tag}.qcow2`);
  const dump = path.join(dir, `${tag}.mem`);
  const vm: Vm = await startVm({ machine, memMiB: MEM_MIB, paused, loads: [{ file: pattern, addr: PATTERN_ADDR }] });
  try {
    const mig = await vm.migrate(snapExec(`save -q ${shellQuote(image)}`), { capabilities: caps, timeoutMs: 60_000 }).catch((err: Error) => {
      // qemu-snap's stderr goes to QEMU's: show it.
      throw new Error(`${err.message}; QEMU/qemu-snap stderr: ${vm.stderr.trim()}`);
    });
    await vm.pmemsave(dump, MEM_MIB << 20);
    return { image, dump, normal: mig.ram?.normal ?? -1 };
  } finally {
    await vm.stop();
  }
}

function qemuImgCheck(image: string): void {
  const out = execFileSync(QEMU_IMG, ['check', image], { encoding: 'utf8' });
  assert.match(out, /No errors were found/);
  assert.not.match(out, /leaked/);
}

/** Reads [offset, offset+length) of the image's virtual disk through qemu-img (QEMU's view). */
function readThroughQemu(image: string, offset: number, length: number): Buffer {
  const raw = path.join(dir, 'convert.raw');
  execFileSync(QEMU_IMG, ['convert', '-O', 'raw', image, raw]);
  try {
    const fd = fs.openSync(raw, 'r');
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    fs.closeSync(fd);
    return b;
  } finally {
    fs.unlinkSync(raw);
  }
}

async function checkImage(s: Saved, expectNormal: boolean): Promise<void> {
  qemuImgCheck(s.image);
  const r = await runCli(['info', '--json', s.image]);
  assert.is(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout.toString());
  assert.is(info.kind, 'image');
  assert.is(info.pageSize, 4096);
  const ram = info.ramBlocks[0];
  assert.is(ram.id, 'pc.ram');
  assert.is(ram.offset, 0);
  assert.is(ram.length, MEM_MIB << 20);
  for (let i = 1; i < info.ramBlocks.length; i++) {
    const prev = info.ramBlocks[i - 1];
    const b = info.ramBlocks[i];
    assert.is(b.offset, Math.ceil((prev.offset + prev.length) / (1 << 20)) * (1 << 20), `block ${b.id} placed after ${prev.id}`);
  }
  if (expectNormal) assert.is(info.pages.normal, s.normal, 'data pages = ram.normal of a paused source');
  assert.ok(info.deviceStateBytes > 1000);
  assert.ok(info.devices.length > 5);
  assert.is(info.qcow2.clusterSize, 1 << 20);
  // Guest RAM as QEMU reads the image equals the guest's own dump (above the
  // legacy VGA/BIOS window, where pmemsave sees ROM instead of RAM).
  const lo = 1 << 20;
  const disk = readThroughQemu(s.image, lo, (MEM_MIB << 20) - lo);
  const mem = fs.readFileSync(s.dump).subarray(lo);
  assert.ok(disk.equals(mem), 'pc.ram on the virtual disk equals pmemsave of the guest');
}

test('pc, paused: image passes qemu-img check and holds guest RAM', async () => {
  const s = await saveVm('pc', true);
  await checkImage(s, true);
});

test('q35, paused', async () => {
  const s = await saveVm('q35', true);
  await checkImage(s, true);
});

test('pc, running', async () => {
  const s = await saveVm('pc', false);
  await checkImage(s, false);
});

test('q35, running', async () => {
  const s = await saveVm('q35', false);
  await checkImage(s, false);
});

test('source with postcopy-ram on: save answers the return path and the migration completes', async () => {
  const s = await saveVm('pc', true, { 'postcopy-ram': true });
  await checkImage(s, true);
});

test('source with return-path on', async () => {
  const s = await saveVm('pc', true, { 'return-path': true });
  await checkImage(s, true);
});

test('an existing image is not replaced without --force; a bad stream leaves no file', async () => {
  const stream = path.join(dir, 'plain.stream');
  const vm = await startVm({ machine: 'pc', memMiB: 128 });
  try {
    await vm.migrate(`exec:cat > ${shellQuote(stream)}`);
  } finally {
    await vm.stop();
  }
  const sub = tempDir('save-target');
  try {
    const image = path.join(sub, 'vm.qcow2');
    const first = await runCli(['save', '-q', image], { input: stream });
    assert.is(first.code, 0, first.stderr);
    const before = fs.readFileSync(image);
    const again = await runCli(['save', '-q', image], { input: stream });
    assert.is(again.code, 1);
    assert.ok(isOneLineError(again.stderr), again.stderr);
    assert.match(again.stderr, /already exists/);
    assert.ok(fs.readFileSync(image).equals(before), 'existing image untouched');
    const forced = await runCli(['save', '-q', '--force', image], { input: stream });
    assert.is(forced.code, 0, forced.stderr);

    const whole = fs.readFileSync(stream);
    const cut = await runCli(['save', '-q', path.join(sub, 'cut.qcow2')], { input: whole.subarray(0, Math.floor(whole.length * 0.6)) });
    assert.is(cut.code, 1);
    assert.ok(isOneLineError(cut.stderr), cut.stderr);
    assert.equal(fs.readdirSync(sub).sort(), ['vm.qcow2'], 'no file left behind');
    const usage = await runCli(['save']);
    assert.is(usage.code, 2);
  } finally {
    fs.rmSync(sub, { recursive: true, force: true });
  }
});

test.run();
