// Issue 16 against real QEMU: `save --qmp` and `restore --qmp` drive QEMU
// over a QMP socket of qemu-snap's own (a second -qmp), with the migration
// stream on a socketpair handed over with getfd.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { startVm, requireQemu, makePattern, patternBytes, linuxGuestVm, waitForTick, lastTick, Vm, VmOptions, QEMU_IMG, compareRange, withSnapQmp, migrationSettings, shellQuote, differsOutsideBios } from './lib';
import { CLI, runCli, tempDir, isOneLineError, CliResult } from './common';
import { openSnapshot } from '../../src/snapshot/snapshot-image';

const dir = tempDir('qmp');
const PATTERN_SEED = 16;
const pattern = path.join(dir, 'pattern.bin');
// The Linux guest's static region: loaded at boot, reserved from Linux (memmap=).
const GUEST_MIB = 256;
const PAT_ADDR = 160 << 20;
const PAT_SIZE = 32 << 20;
// Firmware-only VMs (KVM when usable) for the failure cases: big enough that
// a save throttled to 32 MiB/s runs for seconds.
const FW_MIB = 512;
const FW_PAT_ADDR = 64 << 20;
const FW_PAT_SIZE = 256 << 20;
const fwPattern = path.join(dir, 'fw-pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, PAT_SIZE, PATTERN_SEED);
  makePattern(fwPattern, FW_PAT_SIZE, PATTERN_SEED + 1);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

let sockCounter = 0;
/** A QMP socket path for qemu-snap (QEMU serves one client per socket: the tests keep theirs). */
function snapSocket(): string {
  return path.join(dir, `snap-${++sockCounter}.sock`);
}

/** Runs the CLI and sends `signal` after `afterMs`, or calls `during` then. */
function runCliDuring(args: string[], afterMs: number, during: (pid: number) => void | Promise<void>, timeoutMs = 120_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => (err += s));
    child.stdout.resume();
    let acted: Promise<void> = Promise.resolve();
    const act = setTimeout(() => {
      acted = Promise.resolve(during(child.pid ?? 0));
      acted.catch(reject);
    }, afterMs);
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`qemu-snap ${args.join(' ')} hung; stderr: ${err}`));
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      clearTimeout(act);
      // What was injected has run its course (a killed QEMU has exited).
      acted.then(() => resolve({ code, signal, stdout: Buffer.alloc(0), stderr: err, ms: Date.now() - t0 }), reject);
    });
  });
}

async function imageRegion(image: string, offset: number, length: number): Promise<Buffer> {
  const snap = await openSnapshot(image);
  try {
    return await snap.image.read(offset, length);
  } finally {
    await snap.image.close();
  }
}

function linuxSource(serial: string, sock: string): VmOptions {
  return withSnapQmp(
    linuxGuestVm({ serialFile: serial, dirtyMiB: 16, tickMs: 20, reserve: [[PAT_ADDR, PAT_SIZE]] }, { memMiB: GUEST_MIB, loads: [{ file: pattern, addr: PAT_ADDR }], name: 'qmp-linux-src' }),
    sock,
  );
}

function linuxDestination(serial: string, sock: string, name: string): VmOptions {
  return withSnapQmp(linuxGuestVm({ serialFile: serial }, { memMiB: GUEST_MIB, paused: true, incoming: 'defer', name }), sock);
}

/**
 * A restored Linux guest that did not run on: restore the image again into a
 * paused destination and hold its whole RAM to the image's (the BIOS window
 * 0xA0000-0xFFFFF left out: kvmvapic rewrites it on every incoming migration).
 */
async function restoreEqualsImage(image: string, why: string): Promise<void> {
  const dsock = snapSocket();
  const dst = await startVm(linuxDestination(path.join(dir, 'live-dst2.serial'), dsock, 'qmp-linux-dst2'));
  const ram = path.join(dir, 'live-dst2.mem');
  const want = path.join(dir, 'live-image.mem');
  try {
    const r = await runCli(['restore', '-q', '--paused', '--qmp', dsock, image], { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
    await dst.pmemsave(ram, GUEST_MIB << 20, 0);
  } finally {
    await dst.stop();
  }
  fs.writeFileSync(want, await imageRegion(image, 0, GUEST_MIB << 20));
  const diff = differsOutsideBios(ram, want);
  fs.rmSync(ram);
  fs.rmSync(want);
  assert.is(diff, null, `${why}; and a paused restore of the image differs from the image's RAM at ${diff}`);
  console.log(`  note: the restored guest did not run on (${why}); a paused restore equals the image's RAM byte for byte (QEMU's TCG dirty-tracking miss, docs/qemu-facts.md)`);
}

/** The first tick a restored guest printed. */
function firstTick(serial: string): number {
  return Number(/qsnap-tick (\d+)/.exec(fs.readFileSync(serial, 'latin1'))?.[1] ?? -1);
}

test('save --qmp of a live Linux guest: it counts on, parameters are put back, the pattern is in the image; restore --qmp resumes the count', async () => {
  const image = path.join(dir, 'live.qcow2');
  const srcSerial = path.join(dir, 'live-src.serial');
  const sock = snapSocket();
  const src = await startVm(linuxSource(srcSerial, sock));
  let tickBefore: number;
  let tickAfter: number;
  try {
    await waitForTick(srcSerial, 3, 90_000);
    const before = await migrationSettings(src);
    tickBefore = lastTick(srcSerial);
    const r = await runCli(['save', '--qmp', sock, image], { timeoutMs: 120_000 });
    tickAfter = lastTick(srcSerial);
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stderr, /saved .* over QMP .* the VM is running/);
    assert.is((await src.queryStatus()).status, 'running');
    assert.equal(await migrationSettings(src), before, 'capabilities and parameters as they were');
    const mig = await src.queryMigrate();
    assert.is(mig.status, 'completed');
    // The guest keeps counting after the save.
    await waitForTick(srcSerial, tickAfter + 5, 60_000);
  } finally {
    await src.stop();
  }
  execFileSync(QEMU_IMG, ['check', image]);
  const region = await imageRegion(image, PAT_ADDR, PAT_SIZE);
  assert.ok(region.equals(patternBytes(PAT_SIZE, PATTERN_SEED)), 'the static pattern region of the image matches');

  const dstSerial = path.join(dir, 'live-dst.serial');
  const dsock = snapSocket();
  const dst = await startVm(linuxDestination(dstSerial, dsock, 'qmp-linux-dst'));
  try {
    const r = await runCli(['restore', '--qmp', dsock, image], { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stderr, /running after \d+ ms, completed after \d+ ms/);
    assert.is((await dst.queryStatus()).status, 'running');
    const dump = path.join(dir, 'live-dst-pattern.mem');
    await dst.pmemsave(dump, PAT_SIZE, PAT_ADDR);
    assert.is(compareRange(dump, 0, patternBytes(PAT_SIZE, PATTERN_SEED)), -1, 'restored pattern region');
    const t = await waitForTick(dstSerial, 1, 60_000).catch((err: Error) => err);
    const first = t instanceof Error ? -1 : firstTick(dstSerial);
    // QEMU's dirty tracking under TCG can miss a live guest's last writes
    // (docs/qemu-facts.md, seen on 7.2): the stream, and so the image, then
    // holds a kernel that oopses on cont (the guest never ticks) or dies and
    // reboots (panic=-1: it counts from the start again), as QEMU's own
    // restore of it does. What is ours to get right still is: the restore is the image.
    const missed = t instanceof Error ? t.message : first < tickBefore ? `the restored guest counted from ${first} again (save ran over ticks ${tickBefore}..${tickAfter}): it rebooted` : null;
    if (missed !== null) {
      await dst.stop();
      await restoreEqualsImage(image, missed);
      return;
    }
    // +2: the tick being printed at the switch may sit half in the UART and arrive torn.
    assert.ok(first >= tickBefore && first <= tickAfter + 2, `the restored guest counts on from the save point: first tick ${first}, save ran over ticks ${tickBefore}..${tickAfter} (now ${t})`);
  } finally {
    await dst.stop();
  }
});

test('save --qmp --stop leaves the guest stopped; restore --qmp --postcopy 10 runs it and it counts on', async () => {
  const image = path.join(dir, 'stopped.qcow2');
  const srcSerial = path.join(dir, 'stop-src.serial');
  const sock = snapSocket();
  const src = await startVm(linuxSource(srcSerial, sock));
  let savedTick: number;
  try {
    await waitForTick(srcSerial, 3, 90_000);
    const before = await migrationSettings(src);
    const r = await runCli(['save', '--stop', '--downtime-limit', '500', '--qmp', sock, image], { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
    const st = await src.queryStatus();
    assert.is(st.running, false, `stopped after --stop (${st.status})`);
    assert.equal(await migrationSettings(src), before, 'capabilities and parameters as they were (downtime-limit too)');
    savedTick = lastTick(srcSerial);
    await new Promise((r2) => setTimeout(r2, 500));
    assert.is(lastTick(srcSerial), savedTick, 'no tick while stopped');
  } finally {
    await src.stop();
  }
  const dstSerial = path.join(dir, 'stop-dst.serial');
  const dsock = snapSocket();
  const dst = await startVm(linuxDestination(dstSerial, dsock, 'qmp-postcopy-dst'));
  try {
    const r = await runCli(['restore', '--postcopy', '10', '--qmp', dsock, image], { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stderr, /running after \d+ ms, completed after \d+ ms/);
    const mig = await dst.queryMigrate();
    assert.is(mig.status, 'completed');
    assert.is((await dst.queryStatus()).status, 'running');
    await waitForTick(dstSerial, savedTick + 2, 60_000);
    const first = firstTick(dstSerial);
    assert.ok(first >= savedTick && first <= savedTick + 2, `counts on from ${savedTick} (first tick ${first}; +2: a tick torn in the UART)`);
  } finally {
    await dst.stop();
  }
});

async function firmwareSource(sock: string, name: string): Promise<Vm> {
  return startVm(withSnapQmp({ memMiB: FW_MIB, paused: false, loads: [{ file: fwPattern, addr: FW_PAT_ADDR }], name }, sock));
}

test('restore --qmp --paused into a firmware VM: precopy, memory matches, left paused', async () => {
  const image = path.join(dir, 'fw.qcow2');
  const sock = snapSocket();
  const src = await firmwareSource(sock, 'qmp-fw-src');
  try {
    const before = await migrationSettings(src);
    const nodir = await runCli(['save', '--qmp', sock, path.join(dir, 'no-such-dir', 'x.qcow2')]);
    assert.is(nodir.code, 1);
    assert.ok(isOneLineError(nodir.stderr), nodir.stderr);
    assert.match(nodir.stderr, /cannot write the image there \(ENOENT\); QEMU was not touched/);
    assert.equal(await migrationSettings(src), before);
    assert.is((await src.queryMigrate()).status, undefined, 'no migration was started');
    const r = await runCli(['save', '-q', '--qmp', sock, image]);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stderr, '');
    const again = await runCli(['save', '--progress', '--force', '--qmp', sock, image]);
    assert.is(again.code, 0, again.stderr);
    assert.match(again.stderr, /(^|[\r\n])save: [\d.]+ MiB of [\d.]+ MiB sent \(QEMU: sent \+ dirty\) \(100%\), QEMU completed/, `progress with query-migrate figures: ${JSON.stringify(again.stderr)}`);
  } finally {
    await src.stop();
  }
  const dsock = snapSocket();
  const dst = await startVm(withSnapQmp({ memMiB: FW_MIB, paused: true, incoming: 'defer', name: 'qmp-fw-dst' }, dsock));
  try {
    const r = await runCli(['restore', '--paused', '--qmp', dsock, image]);
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stderr, /left paused/);
    assert.is((await dst.queryStatus()).running, false);
    const dump = path.join(dir, 'fw-dst.mem');
    await dst.pmemsave(dump, FW_PAT_SIZE, FW_PAT_ADDR);
    assert.is(compareRange(dump, 0, fs.readFileSync(fwPattern)), -1);
    fs.unlinkSync(dump);
  } finally {
    await dst.stop();
  }
});

test('save --qmp --cache=none --channels 2 and restore --qmp -n: O_DIRECT both ways, the pattern restored; a file system without O_DIRECT is refused before QEMU is touched', async () => {
  const image = path.join(dir, 'fw-direct.qcow2');
  const sock = snapSocket();
  const src = await firmwareSource(sock, 'qmp-direct-src');
  // ramfs does no O_DIRECT (root only: CI runs as root).
  const ramfs = fs.mkdtempSync(path.join(dir, 'ramfs-'));
  const mounted = spawnSync('mount', ['-t', 'ramfs', 'qemu-snap-test', ramfs]).status === 0;
  try {
    try {
      const before = await migrationSettings(src);
      if (mounted) {
        const refused = await runCli(['save', '-n', '--qmp', sock, path.join(ramfs, 'x.qcow2')]);
        assert.is(refused.code, 1);
        assert.ok(isOneLineError(refused.stderr), refused.stderr);
        assert.match(refused.stderr, /save --cache=none.*x\.qcow2.*QEMU was not touched/);
        assert.equal(fs.readdirSync(ramfs), [], 'nothing left behind');
        assert.equal(await migrationSettings(src), before);
        assert.is((await src.queryMigrate()).status, undefined, 'no migration was started');
      } else console.log('  note: ramfs not mountable (not root): the refusal cases were not run');
      const r = await runCli(['save', '-q', '--cache=none', '--channels', '2', '--stop', '--qmp', sock, image]);
      assert.is(r.code, 0, r.stderr);
      assert.equal(await migrationSettings(src), before, 'parameters and capabilities put back');
    } finally {
      await src.stop();
    }
    const v = await runCli(['verify', '-q', image]);
    assert.is(v.code, 0, v.stderr);
    const dsock = snapSocket();
    const dst = await startVm(withSnapQmp({ memMiB: FW_MIB, paused: true, incoming: 'defer', name: 'qmp-direct-dst' }, dsock));
    try {
      if (mounted) {
        const onRamfs = path.join(ramfs, 'copy.qcow2');
        fs.copyFileSync(image, onRamfs);
        const refused = await runCli(['restore', '-n', '--qmp', dsock, onRamfs]);
        assert.is(refused.code, 1);
        assert.ok(isOneLineError(refused.stderr), refused.stderr);
        assert.match(refused.stderr, /load --cache=none.*copy\.qcow2.*QEMU was not touched/);
        assert.is((await dst.queryStatus()).status, 'inmigrate', 'the destination still waits');
      }
      const r = await runCli(['restore', '-q', '-n', '--paused', '--qmp', dsock, image]);
      assert.is(r.code, 0, r.stderr);
      const dump = path.join(dir, 'fw-direct.mem');
      await dst.pmemsave(dump, FW_PAT_SIZE, FW_PAT_ADDR);
      assert.is(compareRange(dump, 0, fs.readFileSync(fwPattern)), -1);
      fs.unlinkSync(dump);
    } finally {
      await dst.stop();
    }
  } finally {
    if (mounted) spawnSync('umount', [ramfs]);
  }
});

// background-snapshot streams send device state in the middle of the ram
// section (pages the guest writes during the save arrive after it).
test('save --qmp --background: the VM never stops, settings put back; exit 0 only with a published image', async () => {
  const image = path.join(dir, 'background.qcow2');
  const sock = snapSocket();
  const src = await firmwareSource(sock, 'qmp-background');
  let code: number | null;
  try {
    const before = await migrationSettings(src);
    const seenBefore = src.qmp.events.length;
    const r = await runCli(['save', '--background', '--progress', '--qmp', sock, image]);
    code = r.code;
    assert.match(r.stderr, /QEMU (setup|active|completed)/, 'progress from query-migrate');
    assert.equal(await migrationSettings(src), before, 'capabilities and parameters as they were');
    assert.is((await src.queryStatus()).status, 'running');
    // background-snapshot stops the VM once, at the start, for the device
    // state, and write-protects RAM instead of stopping for it.
    const runEvents = src.qmp.events.slice(seenBefore).filter((e) => e.event === 'STOP' || e.event === 'RESUME');
    assert.ok(runEvents.length <= 2, `one stop at most: ${runEvents.map((e) => e.event).join(', ')}`);
    if (runEvents.length > 0) {
      assert.equal(runEvents.map((e) => e.event), ['STOP', 'RESUME']);
      const stoppedMs = runEvents[1].receivedAt - runEvents[0].receivedAt;
      assert.ok(stoppedMs < 1000, `stopped ${stoppedMs} ms, not for the RAM`);
    }
    assert.is((await src.queryMigrate()).status, 'completed', 'QEMU completed its side either way');
    if (r.code === 0) {
      assert.match(r.stderr, /saved .* the VM is running/);
    } else {
      assert.is(r.code, 1);
      const last = r.stderr.trim().split('\n').pop() ?? '';
      assert.match(last, /^qemu-snap: qemu-snap failed: bad stream .* arrives before the end of the ram section; QEMU completed its side, no image written$/);
      assert.not.ok(fs.existsSync(image));
      assert.equal(fs.readdirSync(dir).filter((f) => f.startsWith('.background')), [], 'no temporary file');
    }
  } finally {
    await src.stop();
  }
  if (code !== 0) return;
  const dsock = snapSocket();
  const dst = await startVm(withSnapQmp({ memMiB: FW_MIB, paused: true, incoming: 'defer', name: 'qmp-background-dst' }, dsock));
  try {
    const r = await runCli(['restore', '--qmp', dsock, image]);
    assert.is(r.code, 0, r.stderr);
    const dump = path.join(dir, 'bg-dst.mem');
    await dst.pmemsave(dump, FW_PAT_SIZE, FW_PAT_ADDR);
    assert.is(compareRange(dump, 0, fs.readFileSync(fwPattern)), -1);
    fs.unlinkSync(dump);
  } finally {
    await dst.stop();
  }
});

test('a destination whose RAM differs fails with the reason, exit 1', async () => {
  const image = path.join(dir, 'fw.qcow2');
  const dsock = snapSocket();
  const dst = await startVm(withSnapQmp({ memMiB: FW_MIB * 2, paused: true, incoming: 'defer', name: 'qmp-mismatch' }, dsock));
  try {
    const r = await runCli(['restore', '--qmp', dsock, image]);
    assert.is(r.code, 1, r.stderr);
    assert.ok(isOneLineError(r.stderr), r.stderr);
    assert.match(r.stderr, /RAM block length mismatch: pc\.ram/);
  } finally {
    await dst.stop();
  }
});

/** A save throttled to 32 MiB/s (several seconds), with `inject` run 1.5 s in. */
async function failedSave(tag: string, inject: (ctx: { vm: Vm; pid: number; imageDir: string }) => void | Promise<void>, expect: RegExp): Promise<Vm | null> {
  const imageDir = path.join(dir, `fail-${tag}`);
  fs.mkdirSync(imageDir);
  const sock = snapSocket();
  const vm = await firmwareSource(sock, `qmp-fail-${tag}`);
  let alive: Vm | null = vm;
  try {
    const before = await migrationSettings(vm);
    const r = await runCliDuring(['save', '--max-bandwidth', '32M', '--qmp', sock, path.join(imageDir, 'vm.qcow2')], 1500, (pid) => inject({ vm, pid, imageDir }));
    assert.is(r.code, 1, r.stderr);
    assert.ok(isOneLineError(r.stderr), r.stderr);
    assert.match(r.stderr, expect);
    if (fs.existsSync(imageDir)) assert.equal(fs.readdirSync(imageDir), [], 'nothing left behind');
    if (vm.hasExited) {
      alive = null;
      return null;
    }
    assert.is((await vm.queryStatus()).status, 'running', 'the source runs on');
    assert.equal(await migrationSettings(vm), before, 'capabilities and parameters as they were');
    const mig = await vm.queryMigrate();
    assert.ok(mig.status === 'cancelled' || mig.status === 'failed', `migration ${mig.status}`);
    return vm;
  } finally {
    await alive?.stop();
  }
}

test('failure: the image directory disappears mid-save', async () => {
  await failedSave('rmdir', ({ imageDir }) => fs.rmSync(imageDir, { recursive: true, force: true }), /^qemu-snap: qemu-snap failed: .*QEMU's migration cancelled/);
});

test('failure: SIGINT mid-save', async () => {
  await failedSave('sigint', ({ pid }) => void process.kill(pid, 'SIGINT'), /save interrupted \(SIGINT\)/);
});

test('failure: QEMU quits mid-save', async () => {
  await failedSave('quit', ({ vm }) => vm.kill(), /QEMU went away during the save/);
});

test("failure on QEMU's side: the migration cancelled by another client mid-save", async () => {
  await failedSave('cancel', async ({ vm }) => void (await vm.qmp.execute('migrate_cancel')), /^qemu-snap: QEMU reports the migration cancelled: .*no image was kept\n$/);
});

test('a busy QMP socket is reported within a few seconds', async () => {
  const sock = snapSocket();
  const vm = await startVm(withSnapQmp({ memMiB: 64, name: 'qmp-busy' }, sock));
  const holder = net.createConnection(sock);
  try {
    await new Promise<void>((resolve) => holder.once('data', () => resolve()));
    const r = await runCli(['save', '--qmp', sock, path.join(dir, 'busy.qcow2')], { timeoutMs: 20_000 });
    assert.is(r.code, 1);
    assert.ok(isOneLineError(r.stderr), r.stderr);
    assert.match(r.stderr, /QMP socket busy: another client is connected/);
    assert.ok(r.ms < 8000, `reported after ${r.ms} ms`);
    assert.not.ok(fs.existsSync(path.join(dir, 'busy.qcow2')));
  } finally {
    holder.destroy();
    await vm.stop();
  }
});

test('save --qmp refuses a QEMU that is already migrating, and changes nothing', async () => {
  const sock = snapSocket();
  const vm = await startVm(withSnapQmp({ memMiB: 64, incoming: 'defer', name: 'qmp-inmigrate' }, sock));
  try {
    const r = await runCli(['save', '--qmp', sock, path.join(dir, 'never.qcow2')]);
    assert.is(r.code, 1);
    assert.ok(isOneLineError(r.stderr), r.stderr);
    assert.match(r.stderr, /incoming migration/);
  } finally {
    await vm.stop();
  }
});

test.run();
