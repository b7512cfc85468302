// Issue 13: every RAM capability of QEMU 7.2 and 10.0 is either saved or
// refused by name, with nothing left behind; a failed save is visible on the
// source when the return path is on (SHUT carries the error).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, makePattern, requireQemu, shellQuote, diffRanges, Vm } from './lib';
import { snapExec, tempDir } from './common';

const MEM_MIB = 256;
const PATTERN_ADDR = 32 << 20;
const dir = tempDir('caps');
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, 16 << 20, 41);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Whether this QEMU knows the capability (query-migrate-capabilities lists it). */
async function hasCapability(vm: Vm, name: string): Promise<boolean> {
  const caps = await vm.qmp.execute<Array<{ capability: string }>>('query-migrate-capabilities');
  return caps.some((c) => c.capability === name);
}

/** Files in a fresh directory after a save into it (the image, or a temporary file, if anything was left). */
function leftIn(d: string): string[] {
  return fs.readdirSync(d);
}

/** Migrates into `save IMAGE` expecting QEMU to report the migration failed; returns QEMU's stderr (where qemu-snap's goes). */
async function expectFailedSave(vm: Vm, image: string, caps: Record<string, boolean>): Promise<string> {
  await vm.startMigration(snapExec(`save -q ${shellQuote(image)}`), { capabilities: caps });
  const until = Date.now() + 30_000;
  for (;;) {
    const m = await vm.queryMigrate();
    if (m.status === 'failed') break;
    assert.ok(m.status !== 'completed', 'the migration must not complete');
    assert.ok(Date.now() < until, `still ${m.status} after 30 s`);
    await new Promise((r) => setTimeout(r, 50));
  }
  // qemu-snap's stderr is QEMU's: give it a moment to arrive.
  await new Promise((r) => setTimeout(r, 300));
  return vm.stderr;
}

test('compress (QEMU 7.2; removed in 9.1): zlib pages saved and restored byte-identical', async () => {
  const image = path.join(dir, 'compress.qcow2');
  const srcDump = path.join(dir, 'compress.src.mem');
  const dstDump = path.join(dir, 'compress.dst.mem');
  const src = await startVm({ memMiB: MEM_MIB, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'compress-src' });
  try {
    if (!(await hasCapability(src, 'compress'))) {
      console.log('  this QEMU has no compress capability (removed in 9.1): nothing to save');
      return;
    }
    const info = await src.migrate(snapExec(`save -q ${shellQuote(image)}`), { capabilities: { compress: true } }).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${src.stderr.trim()}`);
    });
    const compression = info.compression as { pages?: number } | undefined;
    assert.ok((compression?.pages ?? 0) >= 4096, `QEMU compressed the pattern's pages (${JSON.stringify(compression)})`);
    await src.pmemsave(srcDump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
  const dst = await startVm({ memMiB: MEM_MIB, incoming: snapExec(`load -q ${shellQuote(image)}`), name: 'compress-dst' });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await dst.pmemsave(dstDump, MEM_MIB << 20);
  } finally {
    await dst.stop();
  }
  const ranges = diffRanges(srcDump, dstDump, 16, 0).filter(([s, e]) => e <= 0xa0000 || s >= 0x100000);
  assert.equal(ranges, [], 'restored memory equals the source');
});

test('x-ignore-shared: refused by name before anything is written', async () => {
  const d = tempDir('caps-xis');
  const image = path.join(d, 'vm.qcow2');
  // 16 MiB of data: QEMU is still writing when save refuses. (A stream small
  // enough to sit whole in the pipe needs the CLI to exit without joining
  // its stdin thread, blocked in read(): issue 15's exit path.)
  const vm = await startVm({ memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'xis' });
  try {
    // With the return path on, the source sees the refusal (without it, a
    // small stream fits the pipe and QEMU may report completed anyway).
    const stderr = await expectFailedSave(vm, image, { 'x-ignore-shared': true, 'return-path': true });
    assert.match(stderr, /qemu-snap: the x-ignore-shared capability is not supported: QEMU leaves shared RAM out of the stream/);
  } finally {
    await vm.stop();
  }
  assert.equal(leftIn(d), [], 'nothing left behind');
  fs.rmSync(d, { recursive: true, force: true });
});

test('multifd and mapped-ram: impossible through exec:, and nothing is left behind', async () => {
  const d = tempDir('caps-multi');
  const image = path.join(d, 'vm.qcow2');
  const vm = await startVm({ memMiB: MEM_MIB, paused: false, name: 'multifd' });
  try {
    // QEMU 10.0 refuses at `migrate`; QEMU 7.2 starts exec: and fails before sending a byte.
    let refusedByQemu: string | null = null;
    try {
      await vm.startMigration(snapExec(`save -q ${shellQuote(image)}`), { capabilities: { multifd: true } });
    } catch (err) {
      refusedByQemu = (err as Error).message;
    }
    if (refusedByQemu !== null) {
      assert.match(refusedByQemu, /multi-channel/);
    } else {
      await vm.waitForMigrationStatus('failed', 30_000).catch((err: Error) => {
        assert.match(err.message, /failed/);
      });
      await new Promise((r) => setTimeout(r, 300));
      assert.match(vm.stderr, /qemu-snap: bad stream at byte 0: empty stream: QEMU sent nothing .*multifd/);
    }
    await vm.setMigrationCapabilities({ multifd: false });
    if (await hasCapability(vm, 'mapped-ram')) {
      let mapped: string | null = null;
      try {
        await vm.startMigration(snapExec(`save -q ${shellQuote(image)}`), { capabilities: { 'mapped-ram': true } });
      } catch (err) {
        mapped = (err as Error).message;
      }
      assert.ok(mapped !== null, 'QEMU refuses mapped-ram through exec:');
      assert.match(mapped, /seekable transport/);
    }
  } finally {
    await vm.stop();
  }
  assert.equal(leftIn(d), [], 'nothing left behind');
  fs.rmSync(d, { recursive: true, force: true });
});

test('switchover-ack (QEMU >= 8.1) on a running source: save acknowledges, QEMU completes, the image restores', async () => {
  const d = tempDir('caps-ack');
  const image = path.join(d, 'vm.qcow2');
  const src = await startVm({ memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'ack-src' });
  try {
    if (!(await hasCapability(src, 'switchover-ack'))) {
      console.log('  this QEMU has no switchover-ack capability (added in 8.1): nothing to save');
      fs.rmSync(d, { recursive: true, force: true });
      return;
    }
    // Without the acknowledgement the source waits in 'active' for ever.
    const info = await src.migrate(snapExec(`save -q ${shellQuote(image)}`), { capabilities: { 'return-path': true, 'switchover-ack': true }, timeoutMs: 30_000 }).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${src.stderr.trim()}`);
    });
    assert.is(info.status, 'completed');
  } finally {
    await src.stop();
  }
  const dstDump = path.join(d, 'dst.mem');
  const dst = await startVm({ memMiB: MEM_MIB, incoming: snapExec(`load -q ${shellQuote(image)}`), name: 'ack-dst' });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await dst.pmemsave(dstDump, MEM_MIB << 20);
  } finally {
    await dst.stop();
  }
  // The pattern never changes while the firmware runs: it must be restored as loaded.
  const got = fs.readFileSync(dstDump).subarray(PATTERN_ADDR, PATTERN_ADDR + (16 << 20));
  assert.ok(got.equals(fs.readFileSync(pattern)), 'the pattern region is restored');
  fs.rmSync(d, { recursive: true, force: true });
});

test('return-path: a save that fails is reported as failed on the source (SHUT carries the error)', async () => {
  const d = tempDir('caps-rp');
  // The image cannot be created: the failure comes after the return path opened.
  const image = path.join(d, 'missing-dir', 'vm.qcow2');
  const vm = await startVm({ memMiB: MEM_MIB, paused: false, name: 'rp-fail' });
  try {
    const t0 = Date.now();
    const stderr = await expectFailedSave(vm, image, { 'return-path': true });
    assert.match(stderr, /qemu-snap: .*missing-dir/);
    assert.ok(Date.now() - t0 < 20_000, 'reported promptly');
    assert.is((await vm.queryMigrate()).status, 'failed');
    // A failed migration leaves the source running.
    assert.is((await vm.queryStatus()).status, 'running');
  } finally {
    await vm.stop();
  }
  assert.equal(leftIn(d), [], 'nothing left behind');
  fs.rmSync(d, { recursive: true, force: true });
});

test.run();
