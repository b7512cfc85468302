// Issue 6 against real QEMU: restore with `load --postcopy PCT` into a
// destination started with -incoming defer and the postcopy-ram capability.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { startVm, makePattern, requireQemu, shellQuote } from './lib';
import { CLI, snapExec, tempDir, isOneLineError, memoryDifference } from './common';

const MEM_MIB = 1024;
const dir = tempDir('postcopy');
const pattern = path.join(dir, 'pattern.bin');
const pausedImage = path.join(dir, 'paused.qcow2');
const pausedDump = path.join(dir, 'paused.mem');

test.before(async () => {
  requireQemu();
  makePattern(pattern, 512 << 20, 31);
  const src = await startVm({ machine: 'pc', memMiB: MEM_MIB, loads: [{ file: pattern, addr: 256 << 20 }] });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(pausedImage)}`));
    await src.pmemsave(pausedDump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

// The destination starts with -S: POSTCOPY_RUN starts an autostart VM at
// once, and a guest that runs changes its memory before the dump.
async function restorePostcopy(image: string, pct: number, expectDump: string, expectPostcopy: boolean, ranRunning = false): Promise<void> {
  const dst = await startVm({ machine: 'pc', memMiB: MEM_MIB, paused: true, incoming: 'defer', name: `postcopy-${pct}` });
  const dump = path.join(dir, `dst-${pct}.mem`);
  try {
    await dst.migrateIncoming(snapExec(`load -q --postcopy ${pct} ${shellQuote(image)}`), { 'postcopy-ram': true });
    await dst.waitForMigrationStatus('completed', 120_000);
    if (expectPostcopy) assert.ok(dst.migrationStatusSeen.has('postcopy-active'), `statuses seen: ${[...dst.migrationStatusSeen.keys()].join(', ')}`);
    await dst.pmemsave(dump, MEM_MIB << 20);
    if (ranRunning) {
      await dst.cont();
      assert.is((await dst.queryStatus()).status, 'running');
    }
  } finally {
    await dst.stop();
  }
  assert.is(memoryDifference(expectDump, dump, ranRunning), null, 'destination memory equals the source');
  fs.unlinkSync(dump);
}

test('--postcopy 10 from a paused source', () => restorePostcopy(pausedImage, 10, pausedDump, true));
test('--postcopy 0', () => restorePostcopy(pausedImage, 0, pausedDump, true));
// With every data page sent before the switch, there may be nothing left to
// page in; QEMU 7.2 then cannot take LISTEN, and the load ends as precopy.
test('--postcopy 100', () => restorePostcopy(pausedImage, 100, pausedDump, false));

test('pages the destination touches while in postcopy are served on request', async () => {
  const dst = await startVm({ machine: 'pc', memMiB: MEM_MIB, paused: true, incoming: 'defer', name: 'postcopy-faults' });
  const during = path.join(dir, 'during.mem');
  const after = path.join(dir, 'after.mem');
  const stats = path.join(dir, 'stats.txt');
  try {
    await dst.migrateIncoming(snapExec(`load -q --postcopy 0 ${shellQuote(pausedImage)} 2>${shellQuote(stats)}`).replace(/^exec:/, 'exec:QEMU_SNAP_STATS=1 '), { 'postcopy-ram': true });
    await dst.waitForMigrationStatus('postcopy-active', 60_000);
    // pmemsave reads all of guest RAM: every page not yet received faults
    // and is requested over the return path.
    await dst.pmemsave(during, MEM_MIB << 20);
    await dst.waitForMigrationStatus('completed', 120_000);
    await dst.pmemsave(after, MEM_MIB << 20);
  } finally {
    await dst.stop();
  }
  assert.is(memoryDifference(pausedDump, during, false), null, 'what the guest saw during postcopy');
  assert.is(memoryDifference(pausedDump, after, false), null);
  const line = fs.readFileSync(stats, 'utf8').split('\n').find((l) => l.startsWith('qemu-snap-stats: '));
  assert.ok(line, 'stats line');
  const st = JSON.parse(line.slice('qemu-snap-stats: '.length)) as { requests?: { count: number } };
  assert.ok((st.requests?.count ?? 0) > 0, `page requests were served: ${line}`);
  fs.unlinkSync(during);
  fs.unlinkSync(after);
});

test('--postcopy 10 from a running source: the VM runs after', async () => {
  const image = path.join(dir, 'running.qcow2');
  const dump = path.join(dir, 'running.mem');
  const src = await startVm({ machine: 'pc', memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: 256 << 20 }] });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(image)}`));
    await src.pmemsave(dump, MEM_MIB << 20);
  } finally {
    await src.stop();
  }
  await restorePostcopy(image, 10, dump, true, true);
});

test('a destination without postcopy-ram: exit 1 saying so, no hang', async () => {
  const dst = await startVm({ machine: 'pc', memMiB: MEM_MIB, incoming: 'defer', name: 'no-postcopy' });
  const errFile = path.join(dir, 'nopostcopy.err');
  try {
    const cmd = `${shellQuote(process.execPath)} ${shellQuote(CLI)} load -q --postcopy 10 ${shellQuote(pausedImage)} 2>${shellQuote(errFile)}; echo $? >> ${shellQuote(errFile)}.rc`;
    await dst.migrateIncoming(`exec:${cmd}`);
    await dst.waitForMigrationStatus('failed', 30_000).catch(() => undefined);
    const deadline = Date.now() + 20_000;
    while (!fs.existsSync(`${errFile}.rc`) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  } finally {
    await dst.stop();
  }
  assert.is(fs.readFileSync(`${errFile}.rc`, 'utf8').trim(), '1');
  const err = fs.readFileSync(errFile, 'utf8');
  assert.ok(isOneLineError(err), err);
  assert.match(err, /postcopy-ram/);
});

test('the return path dies mid-way: exit 1', async () => {
  // stdin (the return path) closes at once while the stream is still going out.
  const child = spawn(process.execPath, [CLI, 'load', '-q', '--postcopy', '0', pausedImage], { stdio: ['pipe', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (err += s));
  child.stdout.resume();
  child.stdin.end();
  const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
  assert.is(code, 1);
  assert.ok(isOneLineError(err), err);
});

test.run();
