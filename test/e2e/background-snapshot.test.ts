// Issue 13, background-snapshot: a RUNNING VM saved with QEMU's
// background-snapshot capability (userfaultfd write protection). QEMU sends
// the ram setup and PART sections while the guest runs, never a SECTION_END
// of ram, and then the device state it captured when the snapshot began
// (bg_migration_thread in migration/migration.c). The restored guest must be
// the guest at that moment: the image restores to the same memory as QEMU's
// own stream does, the pattern is intact, and the VM runs.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, makePattern, requireQemu, shellQuote, compareRange, diffRanges, patternBytes, Vm } from './lib';
import { runCli, snapExec, tempDir, CLI } from './common';

const MEM_MIB = 512;
const PATTERN_ADDR = 64 << 20;
const PATTERN_SIZE = 64 << 20;
const PATTERN_SEED = 31;
const dir = tempDir('bgsnap');
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, PATTERN_SIZE, PATTERN_SEED);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** kvmvapic patches option-ROM space on every incoming migration (docs/qemu-facts.md): leave 0xA0000-0xFFFFF out. */
function ramDifference(a: string, b: string): string | null {
  const ranges = diffRanges(a, b, 64, 0).filter(([s, e]) => !(s >= 0xa0000 && e <= 0x100000));
  return ranges.length === 0 ? null : `differs at ${ranges.slice(0, 8).map(([s, e]) => `0x${s.toString(16)}..0x${e.toString(16)}`).join(', ')}`;
}

async function restore(incoming: string, dump: string, name: string): Promise<number> {
  const t0 = performance.now();
  const dst = await startVm({ memMiB: MEM_MIB, paused: true, incoming, name });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    const ms = performance.now() - t0;
    await dst.pmemsave(dump, MEM_MIB << 20);
    await dst.cont();
    await new Promise((r) => setTimeout(r, 200));
    assert.is((await dst.queryStatus()).status, 'running', `${name}: the restored VM runs`);
    return ms;
  } finally {
    await dst.stop();
  }
}

async function saveRunning(vm: Vm, uri: string, caps: Record<string, boolean>): Promise<{ ms: number; normal: number }> {
  const t0 = performance.now();
  const info = await vm.migrate(uri, { capabilities: caps, timeoutMs: 60_000 }).catch((err: Error) => {
    throw new Error(`${err.message}; QEMU/qemu-snap stderr: ${vm.stderr.trim()}`);
  });
  return { ms: performance.now() - t0, normal: info.ram?.normal ?? -1 };
}

test('background-snapshot of a running VM: saved, restored to the moment it began, and the VM runs', async () => {
  const image = path.join(dir, 'bg.qcow2');
  const raw = path.join(dir, 'bg.stream');
  const fromImage = path.join(dir, 'bg.image.mem');
  const fromRaw = path.join(dir, 'bg.raw.mem');
  const src = await startVm({ memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'bg-src' });
  let saved;
  try {
    await new Promise((r) => setTimeout(r, 300));
    assert.is((await src.queryStatus()).status, 'running');
    // tee keeps QEMU's own stream, to restore the same snapshot without qemu-snap.
    const uri = `exec:tee ${shellQuote(raw)} | ${shellQuote(process.execPath)} ${shellQuote(CLI)} save -q ${shellQuote(image)}`;
    saved = await saveRunning(src, uri, { 'background-snapshot': true });
    // A background snapshot leaves the source running.
    assert.is((await src.queryStatus()).status, 'running', 'the source keeps running');
  } finally {
    await src.stop();
  }
  const info = await runCli(['info', '--json', image]);
  assert.is(info.code, 0, info.stderr);
  // Every page goes out exactly once in a background snapshot.
  assert.is(JSON.parse(info.stdout.toString()).pages.normal, saved.normal, 'data pages in the image = ram.normal');
  const verify = await runCli(['verify', image]);
  assert.is(verify.code, 0, verify.stderr);

  await restore(snapExec(`load -q ${shellQuote(image)}`), fromImage, 'bg-dst-image');
  await restore(`exec:cat ${shellQuote(raw)}`, fromRaw, 'bg-dst-raw');
  assert.is(compareRange(fromImage, PATTERN_ADDR, patternBytes(PATTERN_SIZE, PATTERN_SEED)), -1, 'the pattern is intact');
  assert.is(ramDifference(fromImage, fromRaw), null, 'restored from the image = restored from QEMU\'s own stream');

  // Postcopy restore of the same image.
  const post = await startVm({ memMiB: MEM_MIB, paused: true, incoming: 'defer', name: 'bg-dst-postcopy' });
  const fromPostcopy = path.join(dir, 'bg.postcopy.mem');
  try {
    await post.migrateIncoming(snapExec(`load -q --postcopy 10 ${shellQuote(image)}`), { 'postcopy-ram': true });
    await post.waitForMigrationStatus('completed', 60_000);
    await post.pmemsave(fromPostcopy, MEM_MIB << 20);
  } finally {
    await post.stop();
  }
  assert.is(ramDifference(fromPostcopy, fromRaw), null, 'postcopy restore = QEMU\'s own stream');
});

test('timing: background-snapshot against plain precopy, same running VM (printed, not asserted)', async () => {
  const src = await startVm({ memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'bg-timing' });
  const rows: string[] = [];
  try {
    await new Promise((r) => setTimeout(r, 300));
    for (const [label, caps] of [['precopy', {}], ['background-snapshot', { 'background-snapshot': true }], ['precopy', { 'background-snapshot': false }]] as const) {
      const image = path.join(dir, `t-${label}.qcow2`);
      const s = await saveRunning(src, snapExec(`save -q -f ${shellQuote(image)}`), caps);
      const r = await restore(snapExec(`load -q ${shellQuote(image)}`), path.join(dir, 't.mem'), `t-${label}`);
      rows.push(`${label}: save ${s.ms.toFixed(0)} ms, restore ${r.toFixed(0)} ms`);
      // Plain precopy stops the source: let it run again for the next round.
      if ((await src.queryStatus()).status !== 'running') await src.cont();
    }
  } finally {
    await src.stop();
  }
  console.log(`  ${rows.join('; ')}`);
});

test.run();
