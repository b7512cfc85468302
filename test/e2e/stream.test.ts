// Issue 2 against real QEMU: `qemu-snap info` on captured streams agrees with
// QEMU's own counters, and parse → encode gives back the identical bytes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { Writable } from 'streamx';
import { startVm, makePattern, requireQemu, shellQuote, Machine } from './lib';
import { runCli, tempDir } from './common';
import { MigrationFramer, MigrationEncoder } from '../../src/migration';
import { InputGate } from '../../src/snapshot/input-gate';
import { pumpAsync } from '../../src/util/pump';

const dir = tempDir('stream');
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, 32 << 20, 7);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

async function capture(machine: Machine, paused: boolean): Promise<{ file: string; normal: number; duplicate: number }> {
  const file = path.join(dir, `${machine}-${paused ? 'paused' : 'running'}.stream`);
  const vm = await startVm({ machine, memMiB: 256, paused, loads: [{ file: pattern, addr: 32 << 20 }] });
  try {
    const mig = await vm.migrate(`exec:cat > ${shellQuote(file)}`);
    return { file, normal: mig.ram?.normal ?? -1, duplicate: mig.ram?.duplicate ?? -1 };
  } finally {
    await vm.stop();
  }
}

async function reencodeDigest(file: string): Promise<string> {
  const hash = createHash('sha256');
  const sink = new Writable({
    write(b: unknown, cb: (err: Error | null) => void) {
      hash.update(b as Buffer);
      cb(null);
    },
  });
  await pumpAsync(new InputGate(fs.createReadStream(file, { highWaterMark: 1 << 20 })), new MigrationFramer(), new MigrationEncoder(), sink);
  return hash.digest('hex');
}

function fileDigest(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

for (const [machine, paused] of [['pc', true], ['q35', true], ['pc', false], ['q35', false]] as Array<[Machine, boolean]>) {
  test(`info and round trip: ${machine}, ${paused ? 'paused' : 'running'}`, async () => {
    const cap = await capture(machine, paused);
    const r = await runCli(['info', '--json', cap.file]);
    assert.is(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout.toString());
    assert.is(info.kind, 'stream');
    assert.match(info.machine, machine === 'pc' ? /^pc-i440fx/ : /^pc-q35/);
    assert.is(info.pageSize, 4096);
    assert.is(info.pages.normal, cap.normal, 'PAGE records = query-migrate ram.normal');
    assert.is(info.pages.zero, cap.duplicate, 'ZERO records = query-migrate ram.duplicate');
    const ram = info.ramBlocks.find((b: { id: string }) => b.id === (machine === 'pc' ? 'pc.ram' : 'pc.ram'));
    assert.ok(ram, `pc.ram among ${JSON.stringify(info.ramBlocks)}`);
    assert.is(ram.length, 256 << 20);
    assert.ok(info.devices.length > 5, 'devices from VMDESCRIPTION');
    assert.ok(info.totalBytes === fs.statSync(cap.file).size);
    assert.is(await reencodeDigest(cap.file), fileDigest(cap.file), 'parse → encode is the identity');

    const text = await runCli(['info', cap.file]);
    assert.is(text.code, 0);
    assert.match(text.stdout.toString(), /pages: \d+ data, \d+ zero/);
    fs.unlinkSync(cap.file);
  });
}

test('info reads a stream on stdin and fails cleanly on a truncated one', async () => {
  const cap = await capture('pc', true);
  const whole = fs.readFileSync(cap.file);
  const ok = await runCli(['info', '--json', '-'], { input: whole });
  assert.is(ok.code, 0, ok.stderr);
  assert.is(JSON.parse(ok.stdout.toString()).pages.normal, cap.normal);
  const cut = await runCli(['info', '-'], { input: whole.subarray(0, Math.floor(whole.length / 2)) });
  assert.is(cut.code, 1);
  assert.match(cut.stderr, /^qemu-snap: .*byte \d+/);
  assert.is(cut.stderr.trim().split('\n').length, 1);
  const usage = await runCli(['info']);
  assert.is(usage.code, 2);
  fs.unlinkSync(cap.file);
});

test.run();
