// A live Linux guest (TCG) that dirties memory while it is saved through
// exec:qemu-snap save: the migration re-sends pages over several passes. The
// source, stopped at completion, and the restored destination (-S) must hold
// the same memory, and a restored guest counts on from where it was saved.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, requireQemu, shellQuote, linuxGuestVm, waitForTick, lastTick, diffRanges } from './lib';
import { snapExec, tempDir } from './common';

const MEM_MIB = 256;
const dir = tempDir('linux');

test.before(() => {
  requireQemu();
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Differences outside 0xA0000-0xFFFFF (kvmvapic rewrites bytes there on every incoming migration). */
function differsOutsideBios(a: string, b: string): string | null {
  const ranges = diffRanges(a, b, 16, 0).filter(([s, e]) => e <= 0xa0000 || s >= 0x100000);
  return ranges.length ? ranges.map(([s, e]) => `0x${s.toString(16)}..0x${e.toString(16)}`).join(', ') : null;
}

test('a live Linux guest saved while it dirties memory restores byte-identical and counts on', async () => {
  const image = path.join(dir, 'live.qcow2');
  const srcSerial = path.join(dir, 'src.serial');
  const dstSerial = path.join(dir, 'dst.serial');
  const srcDump = path.join(dir, 'src.mem');
  const dstDump = path.join(dir, 'dst.mem');
  const src = await startVm(linuxGuestVm({ serialFile: srcSerial, dirtyMiB: 32, tickMs: 20 }, { memMiB: MEM_MIB, name: 'linux-src' }));
  let savedTick: number;
  try {
    await waitForTick(srcSerial, 3, 90_000);
    const info = await src.migrate(snapExec(`save -q ${shellQuote(image)}`), { timeoutMs: 120_000 });
    assert.is(info.status, 'completed');
    assert.ok((info.ram?.['dirty-sync-count'] ?? 0) >= 2, `the guest dirtied memory between passes (dirty-sync-count ${info.ram?.['dirty-sync-count']})`);
    assert.is((await src.queryStatus()).status, 'postmigrate');
    savedTick = lastTick(srcSerial);
    await src.pmemsave(srcDump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
  const dst = await startVm(linuxGuestVm({ serialFile: dstSerial }, { memMiB: MEM_MIB, paused: true, incoming: snapExec(`load -q ${shellQuote(image)}`), name: 'linux-dst' }));
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await dst.pmemsave(dstDump, MEM_MIB << 20);
    assert.is(differsOutsideBios(srcDump, dstDump), null, 'destination memory equals the stopped source');
    await dst.cont();
    const t = await waitForTick(dstSerial, savedTick + 2, 60_000);
    const first = Number(/qsnap-tick (\d+)/.exec(fs.readFileSync(dstSerial, 'latin1'))?.[1]);
    assert.ok(first >= savedTick && first <= savedTick + 1, `the restored guest counts on from ${savedTick} (first tick ${first}, now ${t})`);
  } finally {
    await dst.stop();
  }
});

test.run();
