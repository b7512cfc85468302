// Issue 14 against real QEMU: every --cache mode saves a paused VM driven by
// QEMU's own `migrate "exec:..."` (pc and q35), the images of all modes are
// byte-identical and `qemu-img check` clean, and the image restores through
// `load` and `load --cache=none` into byte-identical guest memory; the same
// with --aio=native (Linux AIO) on both sides, and io_uring.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { startVm, makePattern, requireQemu, shellQuote, Machine, QEMU_IMG } from './lib';
import { runCli, snapExec, tempDir, memoryDifference } from './common';

const MEM_MIB = 256;
const MODES = ['writeback', 'none', 'writethrough', 'directsync', 'unsafe'] as const;
const dir = tempDir('cache');
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, 64 << 20, 41);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function qemuImgCheck(image: string): void {
  const out = execFileSync(QEMU_IMG, ['check', image], { encoding: 'utf8' });
  assert.match(out, /No errors were found/);
  assert.not.match(out, /leaked/);
}

async function restore(machine: Machine, image: string, loadArgs: string, dump: string): Promise<void> {
  const dst = await startVm({ machine, memMiB: MEM_MIB, paused: true, incoming: snapExec(`load -q ${loadArgs} ${shellQuote(image)}`), name: `${machine}-dst` });
  try {
    const done = await dst.waitForMigrationStatus('completed', 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; QEMU/qemu-snap stderr: ${dst.stderr.trim()}`);
    });
    assert.is(done.status, 'completed');
    await dst.pmemsave(dump, MEM_MIB << 20);
  } finally {
    await dst.stop();
  }
}

async function everyMode(machine: Machine): Promise<void> {
  const srcDump = path.join(dir, `${machine}.src.mem`);
  const images: string[] = [];
  const streams: string[] = [];
  for (const mode of MODES) {
    const image = path.join(dir, `${machine}-${mode}.qcow2`);
    const stream = path.join(dir, `${machine}-${mode}.stream`);
    const src = await startVm({ machine, memMiB: MEM_MIB, paused: true, loads: [{ file: pattern, addr: 32 << 20 }], name: `${machine}-src-${mode}` });
    try {
      // tee keeps the exact stream QEMU sent (its device state differs from one VM to the next).
      const uri = `exec:tee ${shellQuote(stream)} | ${snapExec(`save -q --cache=${mode} ${shellQuote(image)}`).slice('exec:'.length)}`;
      await src.migrate(uri, { timeoutMs: 60_000 }).catch((err: Error) => {
        throw new Error(`${mode}: ${err.message}; QEMU/qemu-snap stderr: ${src.stderr.trim()}`);
      });
      if (images.length === 0) await src.pmemsave(srcDump, MEM_MIB << 20);
    } finally {
      await src.stop();
    }
    qemuImgCheck(image);
    images.push(image);
    streams.push(stream);
  }
  for (let i = 0; i < MODES.length; i++) {
    // The guest RAM of a paused VM is the same in every save.
    if (i > 0) execFileSync(QEMU_IMG, ['compare', '-q', images[0], images[i]]);
    // The same stream saved buffered and gathered (writeback, native), copied
    // (without the native module) and direct: byte for byte the same image.
    const want = fs.readFileSync(images[i]);
    for (const [tag, args, env] of [
      ['writeback', ['--cache=writeback'], {}],
      ['copied', ['--cache=writeback'], { QEMU_SNAP_NATIVE: '0' }],
      ['direct', ['--cache=none'], {}],
    ] as const) {
      const again = path.join(dir, `${machine}-again.qcow2`);
      const r = await runCli(['save', '-q', '-f', ...args, '-i', streams[i], again], { env });
      assert.is(r.code, 0, r.stderr);
      assert.ok(want.equals(fs.readFileSync(again)), `the --cache=${MODES[i]} image equals the stream saved again ${tag}`);
      fs.unlinkSync(again);
    }
  }
  for (const [tag, args] of [['default', ''], ['none', '--cache=none --max-in-flight 4'], ['nocache', '-n']] as const) {
    const dump = path.join(dir, `${machine}.${tag}.mem`);
    // Restore the image QEMU saved through O_DIRECT, through each load mode.
    await restore(machine, images[1], args, dump);
    assert.is(memoryDifference(srcDump, dump, false), null, `load ${args}: destination memory equals the source`);
    fs.unlinkSync(dump);
  }
  if (machine === 'pc') await postcopyDirect(images[1], srcDump);
  for (const f of [...images, ...streams, srcDump]) fs.unlinkSync(f);
}

/** load -n --postcopy 0: guest memory read during postcopy faults every page in through the urgent lane, over O_DIRECT. */
async function postcopyDirect(image: string, srcDump: string, extraArgs = ''): Promise<void> {
  const dump = path.join(dir, 'postcopy.mem');
  const dst = await startVm({ machine: 'pc', memMiB: MEM_MIB, paused: true, incoming: 'defer', name: 'postcopy-direct' });
  try {
    await dst.migrateIncoming(snapExec(`load -q -n ${extraArgs} --max-in-flight 2 --postcopy 0 ${shellQuote(image)}`), { 'postcopy-ram': true });
    await dst.waitForMigrationStatus('postcopy-active', 60_000);
    await dst.pmemsave(dump, MEM_MIB << 20);
    await dst.waitForMigrationStatus('completed', 60_000);
  } finally {
    await dst.stop();
  }
  assert.is(memoryDifference(srcDump, dump, false), null, `load -n ${extraArgs} --postcopy 0: destination memory equals the source`);
  fs.unlinkSync(dump);
}

/**
 * --aio=native (Linux AIO): QEMU saves through `save -n --aio=native`, the
 * image is byte-identical to the same stream saved with --aio=threads (and
 * io_uring) and qemu-img check clean, and `load -n --aio=native` (and
 * io_uring) restores identical memory (precopy; and postcopy's urgent lane
 * on pc).
 */
async function aioNative(machine: Machine): Promise<void> {
  const srcDump = path.join(dir, `${machine}.aio.src.mem`);
  const image = path.join(dir, `${machine}-aio.qcow2`);
  const stream = path.join(dir, `${machine}-aio.stream`);
  const src = await startVm({ machine, memMiB: MEM_MIB, paused: true, loads: [{ file: pattern, addr: 32 << 20 }], name: `${machine}-src-aio` });
  try {
    const uri = `exec:tee ${shellQuote(stream)} | ${snapExec(`save -q -n --aio=native --max-in-flight 4 ${shellQuote(image)}`).slice('exec:'.length)}`;
    await src.migrate(uri, { timeoutMs: 60_000 }).catch((err: Error) => {
      throw new Error(`--aio=native: ${err.message}; QEMU/qemu-snap stderr: ${src.stderr.trim()}`);
    });
    await src.pmemsave(srcDump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
  qemuImgCheck(image);
  const want = fs.readFileSync(image);
  for (const args of [['-n', '--aio=threads'], ['--cache=directsync', '--aio=native', '--max-in-flight', '1'], ['--cache=writeback'], ['-n', '--aio=io_uring']]) {
    const again = path.join(dir, `${machine}-aio-again.qcow2`);
    const r = await runCli(['save', '-q', '-f', ...args, '-i', stream, again]);
    assert.is(r.code, 0, r.stderr);
    assert.ok(want.equals(fs.readFileSync(again)), `the --aio=native image equals the stream saved again with ${args.join(' ')}`);
    fs.unlinkSync(again);
  }
  for (const args of ['-n --aio=native --max-in-flight 4', '--cache=directsync --aio=native --max-in-flight 1', '-n --aio=io_uring --max-in-flight 3']) {
    const dump = path.join(dir, `${machine}.aio.mem`);
    await restore(machine, image, args, dump);
    assert.is(memoryDifference(srcDump, dump, false), null, `load ${args}: destination memory equals the source`);
    fs.unlinkSync(dump);
  }
  if (machine === 'pc') await postcopyDirect(image, srcDump, '--aio=native');
  for (const f of [image, stream, srcDump]) fs.unlinkSync(f);
}

test('pc, paused: every cache mode saves the same image and restores byte-identical memory', () => everyMode('pc'));
test('q35, paused: every cache mode', () => everyMode('q35'));
test('pc, paused: save -n --aio=native, byte-identical to --aio=threads, restores identical memory (precopy and postcopy)', () => aioNative('pc'));
test('q35, paused: save -n --aio=native and load -n --aio=native', () => aioNative('q35'));

test.run();
