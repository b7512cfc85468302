// Issue 13 on a live Linux guest (TCG: this kernel prints nothing under
// this host's nested KVM) that dirties memory:
//  - XBZRLE over several passes: QEMU sends deltas of re-sent pages, save
//    applies them; the stopped source equals the restored destination;
//  - background-snapshot: the image restores to the moment the snapshot
//    began (the same memory as QEMU's own stream, the guest's counter from
//    then), while the source ran on.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, requireQemu, shellQuote, linuxGuestVm, waitForTick, lastTick, sleep, differsOutsideBios } from './lib';
import { snapExec, tempDir, CLI } from './common';

const MEM_MIB = 256;
const dir = tempDir('linux-live');

test.before(() => {
  requireQemu();
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function firstTick(serial: string): number {
  return Number(/qsnap-tick (\d+)/.exec(fs.readFileSync(serial, 'latin1'))?.[1] ?? -1);
}

/** A restored guest started without -S runs by itself and counts on from `from`. */
async function restoreRunning(incoming: string, tag: string, from: number): Promise<number> {
  const serial = path.join(dir, `${tag}.run.serial`);
  const dst = await startVm(linuxGuestVm({ serialFile: serial }, { memMiB: MEM_MIB, paused: false, incoming, name: `${tag}-run` }));
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await waitForTick(serial, from + 2, 60_000);
    assert.is((await dst.queryStatus()).status, 'running');
    return firstTick(serial);
  } finally {
    await dst.stop();
  }
}

async function dumpRestored(incoming: string, dump: string, name: string): Promise<void> {
  const dst = await startVm(linuxGuestVm({ serialFile: path.join(dir, `${name}.serial`) }, { memMiB: MEM_MIB, paused: true, incoming, name }));
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await dst.pmemsave(dump, MEM_MIB << 20);
  } finally {
    await dst.stop();
  }
}

test('XBZRLE over several passes of a guest that dirties memory: restored byte-identical to QEMU\'s own restore and the stopped source', async () => {
  const image = path.join(dir, 'xbzrle.qcow2');
  const raw = path.join(dir, 'xbzrle.stream');
  const rawDump = path.join(dir, 'xbzrle.raw.mem');
  const srcSerial = path.join(dir, 'xbzrle.src.serial');
  const srcDump = path.join(dir, 'xbzrle.src.mem');
  const dstDump = path.join(dir, 'xbzrle.dst.mem');
  const src = await startVm(linuxGuestVm({ serialFile: srcSerial, dirtyMiB: 16, tickMs: 20 }, { memMiB: MEM_MIB, name: 'xbzrle-src' }));
  let savedTick: number;
  try {
    await waitForTick(srcSerial, 3, 90_000);
    // A 1 ms downtime limit keeps QEMU iterating while the guest dirties
    // memory: pages are cached in the second pass and sent as deltas after.
    await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 1, 'xbzrle-cache-size': 64 << 20 });
    // tee keeps QEMU's own stream, for QEMU's own decoding of the same deltas.
    const uri = `exec:tee ${shellQuote(raw)} | ${shellQuote(process.execPath)} ${shellQuote(CLI)} save -q ${shellQuote(image)}`;
    await src.startMigration(uri, { capabilities: { xbzrle: true } });
    const until = Date.now() + 60_000;
    let cachePages = 0;
    for (;;) {
      const m = await src.queryMigrate();
      if (m.status === 'failed') throw new Error(`migration failed: ${m['error-desc']}; stderr: ${src.stderr}`);
      cachePages = (m['xbzrle-cache'] as { pages?: number } | undefined)?.pages ?? 0;
      if (cachePages >= 2000 && (m.ram?.['dirty-sync-count'] ?? 0) >= 4) break;
      if (Date.now() > until) throw new Error(`no XBZRLE pages after 60 s (${JSON.stringify(m['xbzrle-cache'])}, status ${m.status})`);
      await sleep(100);
    }
    await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 300000 });
    const info = await src.waitForMigrationStatus('completed', 120_000).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${src.stderr.trim()}`);
    });
    const xb = info['xbzrle-cache'] as { pages: number; 'cache-miss': number; overflow: number };
    assert.ok(xb.pages >= 2000, `QEMU sent XBZRLE pages (${JSON.stringify(xb)})`);
    assert.ok((info.ram?.['dirty-sync-count'] ?? 0) >= 4, `several passes (dirty-sync-count ${info.ram?.['dirty-sync-count']})`);
    assert.is((await src.queryStatus()).status, 'postmigrate');
    savedTick = lastTick(srcSerial);
    await src.pmemsave(srcDump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
  await dumpRestored(snapExec(`load -q ${shellQuote(image)}`), dstDump, 'xbzrle-dst');
  await dumpRestored(`exec:cat ${shellQuote(raw)}`, rawDump, 'xbzrle-raw');
  assert.is(differsOutsideBios(rawDump, dstDump), null, 'the image restores what QEMU itself decodes from the same stream');
  // Measured here (TCG, 7.2): now and then the stopped source differs from
  // QEMU's own restore of its stream in a few bytes of a kernel stack page.
  // That is between QEMU and its stream; where QEMU agrees with its source,
  // so must the image.
  const sourceVsQemu = differsOutsideBios(srcDump, rawDump);
  if (sourceVsQemu === null) assert.is(differsOutsideBios(srcDump, dstDump), null, 'destination memory equals the stopped source');
  else console.log(`  note: QEMU's own restore differs from the stopped source at ${sourceVsQemu}`);
  // A guest restored from a stream that QEMU itself restores wrongly may
  // never tick again: then the image is held to what QEMU's own restore does.
  const first = await restoreRunning(snapExec(`load -q ${shellQuote(image)}`), 'xbzrle', savedTick).catch((err: Error) => {
    if (sourceVsQemu === null) throw err;
    return -1;
  });
  if (!(first >= savedTick && first <= savedTick + 1)) {
    // Where QEMU's own restore of the stream does not count on either, the stream is at fault.
    const qemuFirst = await restoreRunning(`exec:cat ${shellQuote(raw)}`, 'xbzrle-raw', savedTick).catch(() => -1);
    const serial = fs.readFileSync(path.join(dir, 'xbzrle.run.serial'), 'latin1').slice(0, 600).replace(/\s+/g, ' ');
    assert.ok(qemuFirst < savedTick || qemuFirst > savedTick + 1, `the restored guest counts on from ${savedTick} (first tick ${first}; QEMU's own restore: ${qemuFirst}); serial: ${serial}`);
    console.log(`  note: neither the image nor QEMU's own restore resumed at tick ${savedTick} (${first}, ${qemuFirst}); serial: ${serial}`);
  }
});

test('background-snapshot of a guest that dirties memory: restored to the moment it began, while the source ran on', async () => {
  const image = path.join(dir, 'bg.qcow2');
  const raw = path.join(dir, 'bg.stream');
  const srcSerial = path.join(dir, 'bg.src.serial');
  const fromImage = path.join(dir, 'bg.image.mem');
  const fromRaw = path.join(dir, 'bg.raw.mem');
  const src = await startVm(linuxGuestVm({ serialFile: srcSerial, dirtyMiB: 16, tickMs: 20 }, { memMiB: MEM_MIB, name: 'bg-linux-src' }));
  let before: number;
  let after: number;
  try {
    await waitForTick(srcSerial, 3, 90_000);
    before = lastTick(srcSerial);
    const uri = `exec:tee ${shellQuote(raw)} | ${shellQuote(process.execPath)} ${shellQuote(CLI)} save -q ${shellQuote(image)}`;
    await src.migrate(uri, { capabilities: { 'background-snapshot': true }, timeoutMs: 120_000 }).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${src.stderr.trim()}`);
    });
    assert.is((await src.queryStatus()).status, 'running', 'the source runs on');
    // The source keeps counting after the snapshot completed.
    after = await waitForTick(srcSerial, lastTick(srcSerial) + 3, 60_000);
  } finally {
    await src.stop();
  }
  await dumpRestored(snapExec(`load -q ${shellQuote(image)}`), fromImage, 'bg-image');
  await dumpRestored(`exec:cat ${shellQuote(raw)}`, fromRaw, 'bg-raw');
  assert.is(differsOutsideBios(fromImage, fromRaw), null, 'the image restores the memory of QEMU\'s own stream');
  const first = await restoreRunning(snapExec(`load -q ${shellQuote(image)}`), 'bg', before);
  // Device state and RAM were taken when the snapshot began: the guest
  // resumes near the tick seen just before migrate (setup may take a tick
  // or two), not where the source was when we stopped it.
  assert.ok(first >= before && first <= before + 3, `restored at the snapshot's start: first tick ${first}, ${before} before the snapshot, ${after} at the end`);
});

test.run();
