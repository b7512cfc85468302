// Issue 18, the restore half, against real QEMU: `restore --qmp SOCKET
// --channels N IMAGE` connects to a `-incoming defer` destination N+1 times
// and sends the data pages as multifd packets; the restored memory is the
// source's, whatever channel count saved or restores the image.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { startVm, requireQemu, makePattern, Vm, VmOptions, Machine, differsOutsideBios, withSnapQmp, migrationSettings, sleep } from './lib';
import { CLI, runCli, snapExec, tempDir, isOneLineError } from './common';
import { shellQuote } from './lib';
import { restoreViaQmp } from '../../src/qmp/restore';

const dir = tempDir('multifd-restore');
const MEM_MIB = 256;
const PAT_ADDR = 32 << 20;
const PAT_SIZE = 96 << 20;
const pattern = path.join(dir, 'pattern.bin');
const srcDump = path.join(dir, 'src.mem');

test.before(() => {
  requireQemu();
  makePattern(pattern, PAT_SIZE, 1818);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

let sockCounter = 0;
function snapSocket(): string {
  return path.join(dir, `snap-${++sockCounter}.sock`);
}

/** qemu-snap's private migration socket directories in the temp dir. */
function privateDirs(): string[] {
  return fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith('qemu-snap-mig-')).sort();
}

const images: Record<string, string> = {};

/** A paused source with the pattern in RAM, saved with `args`; its memory dumped once. */
async function saveSource(name: string, args: (sock: string, image: string) => string[]): Promise<string> {
  const sock = snapSocket();
  const image = path.join(dir, `${name}.qcow2`);
  const src = await startVm(withSnapQmp({ memMiB: MEM_MIB, paused: true, loads: [{ file: pattern, addr: PAT_ADDR }], name: `mfr-src-${name}` }, sock));
  try {
    if (!fs.existsSync(srcDump)) await src.pmemsave(srcDump, MEM_MIB << 20);
    const r = await runCli(args(sock, image), { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
  } finally {
    await src.stop();
  }
  return image;
}

/** Plain save: QEMU's own migrate exec: into qemu-snap save. */
async function plainSave(name: string, machine?: Machine): Promise<string> {
  const image = path.join(dir, `${name}.qcow2`);
  const src = await startVm({ machine, memMiB: MEM_MIB, paused: true, loads: [{ file: pattern, addr: PAT_ADDR }], name: `mfr-src-${name}` });
  try {
    if (!fs.existsSync(srcDump)) await src.pmemsave(srcDump, MEM_MIB << 20);
    await src.migrate(snapExec(`save -q ${shellQuote(image)}`));
  } finally {
    await src.stop();
  }
  return image;
}

// A machine type of 7.2's time: multifd-flush-after-each-section is on for
// it on every QEMU (hw_compat_8_0), so the destination syncs at each EOS.
const OLD_MACHINE = 'pc-i440fx-7.2' as Machine;

test('images to restore: plain `save` through exec: (also on a pc-i440fx-7.2 machine), save --qmp over 1 and over 4 channels', async () => {
  images.plain = await plainSave('plain');
  images.old = await plainSave('old', OLD_MACHINE);
  images.qmp1 = await saveSource('qmp1', (sock, img) => ['save', '-q', '--qmp', sock, img]);
  images.qmp4 = await saveSource('qmp4', (sock, img) => ['save', '-q', '--qmp', sock, '--channels', '4', img]);
});

/** Capabilities and parameters, less `events` (restore --qmp turns it on for its wait and leaves it on, whatever the channel count). */
async function settingsButEvents(vm: Vm): Promise<unknown> {
  const s = (await migrationSettings(vm)) as { caps: Array<{ capability: string }>; params: unknown };
  return { caps: s.caps.filter((c) => c.capability !== 'events'), params: s.params };
}

/** Restores `image` over `channels` into a fresh -S destination; returns the CLI's stderr and the dump's difference. */
async function restoreAndCompare(image: string, channels: number, tag: string, extra: string[] = [], vm: VmOptions = {}): Promise<string> {
  const dsock = snapSocket();
  const tmpBefore = privateDirs();
  const dst = await startVm(withSnapQmp({ ...vm, memMiB: MEM_MIB, paused: true, incoming: 'defer', name: `mfr-dst-${tag}` }, dsock));
  try {
    const before = await settingsButEvents(dst);
    const r = await runCli(['restore', '--paused', '--qmp', dsock, '--channels', String(channels), ...extra, image], { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stderr, channels > 1 ? new RegExp(`restored .* over QMP \\(${channels} multifd channels\\): left paused`) : /restored .* over QMP: left paused/);
    const mig = await dst.queryMigrate();
    assert.is(mig.status, 'completed');
    assert.is((await dst.queryStatus()).running, false, 'left paused');
    assert.equal(await settingsButEvents(dst), before, 'multifd and multifd-channels put back');
    assert.equal(privateDirs(), tmpBefore, 'the private socket directory is removed');
    const dump = path.join(dir, `dst-${tag}.mem`);
    await dst.pmemsave(dump, MEM_MIB << 20);
    const diff = differsOutsideBios(srcDump, dump);
    fs.unlinkSync(dump);
    assert.is(diff, null, `restored memory equals the source (${tag})`);
    return r.stderr;
  } finally {
    await dst.stop();
  }
}

for (const channels of [1, 2, 4]) {
  test(`restore --qmp --channels ${channels} of an image from plain save: memory identical to the source`, async () => {
    await restoreAndCompare(images.plain, channels, `plain-${channels}`);
  });
}

test('a pc-i440fx-7.2 destination (sync at every EOS) with its own -uuid, which 7.2 checks each channel against: 2 channels', async () => {
  await restoreAndCompare(images.old, 2, 'old-2', [], { machine: OLD_MACHINE, extraArgs: ['-uuid', '3f2504e0-4f89-11d3-9a0c-0305e82c3301'] });
});

test('a destination of the current machine type with its own -uuid: 4 channels', async () => {
  await restoreAndCompare(images.plain, 4, 'uuid-4', [], { extraArgs: ['-uuid', '3f2504e0-4f89-11d3-9a0c-0305e82c3302'] });
});

test('an image saved over 4 channels restores over 1, one saved over 1 restores over 4 (and --cache=none over 2)', async () => {
  await restoreAndCompare(images.qmp4, 1, 'qmp4-over-1');
  await restoreAndCompare(images.qmp1, 4, 'qmp1-over-4');
  await restoreAndCompare(images.qmp4, 2, 'qmp4-over-2-none', ['--cache', 'none']);
});

test('a destination that cannot take multifd: one line naming the capability and QEMU\'s reason, nothing sent, it still waits', async () => {
  const dsock = snapSocket();
  const dst = await startVm(withSnapQmp({ memMiB: MEM_MIB, paused: true, incoming: 'defer', name: 'mfr-dst-refuse' }, dsock));
  try {
    // QEMU refuses multifd next to compress (7.2) or xbzrle (10.0).
    const caps = (await dst.qmp.execute('query-migrate-capabilities')) as Array<{ capability: string }>;
    const conflicting = caps.some((c) => c.capability === 'compress') ? 'compress' : 'xbzrle';
    await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: conflicting, state: true }] });
    const before = await migrationSettings(dst);
    const r = await runCli(['restore', '--qmp', dsock, '--channels', '2', images.plain]);
    assert.is(r.code, 1, r.stderr);
    assert.ok(isOneLineError(r.stderr), r.stderr);
    assert.match(r.stderr, new RegExp(`the destination refused the multifd capability that --channels 2 needs: Multifd is not compatible with ${conflicting}`, 'i'));
    assert.equal(await migrationSettings(dst), before, 'settings as they were');
    assert.is((await dst.queryStatus()).status, 'inmigrate', 'still waiting for an incoming migration');
    // --postcopy with --channels: refused by name before QEMU is touched.
    const pc = await runCli(['restore', '--qmp', dsock, '--channels', '2', '--postcopy', '10', images.plain]);
    assert.is(pc.code, 2, pc.stderr);
    assert.match(pc.stderr, /--postcopy cannot be combined with --channels 2: QEMU 10\.0 refuses postcopy-ram with multifd/);
    // With the conflict gone, the same destination restores over 2 channels.
    await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: conflicting, state: false }] });
    const ok = await runCli(['restore', '--paused', '--qmp', dsock, '--channels', '2', images.plain], { timeoutMs: 120_000 });
    assert.is(ok.code, 0, ok.stderr);
  } finally {
    await dst.stop();
  }
});

// The one thing qemu-snap cannot read: the migration property
// multifd-flush-after-each-section (8.0 and later), set against the machine
// type with -global. The destination then waits at other sync marks than the
// ones sent; qemu-snap must end with a message that says so, not hang.
for (const [machine, value, what] of [
  [undefined, 'on', /QEMU stopped answering QMP|QEMU has not completed 5 s after the whole stream went out/],
  [OLD_MACHINE, 'off', /QEMU has read nothing from the full multifd channels for 5 s|QEMU has not completed 5 s after the whole stream went out|QEMU stopped answering QMP/],
] as const) {
  test(`a destination started with -global migration.multifd-flush-after-each-section=${value} on ${machine ?? 'the current machine type'}: ends with the hint, not a hang (QEMU >= 8.0)`, async () => {
    const dsock = snapSocket();
    const probe = await startVm({ memMiB: 64, paused: true, incoming: 'defer', name: 'mfr-probe' });
    const version = ((await probe.qmp.execute('query-version')) as { qemu: { major: number } }).qemu.major;
    await probe.stop();
    if (version < 8) return; // 7.2 has no such property: it always syncs at EOS
    const image = machine ? images.old : images.plain;
    const dst = await startVm(withSnapQmp({ machine, memMiB: MEM_MIB, paused: true, incoming: 'defer', name: `mfr-dst-global-${value}`, extraArgs: ['-global', `migration.multifd-flush-after-each-section=${value}`] }, dsock));
    const tmpBefore = privateDirs();
    try {
      const t0 = Date.now();
      const err = await restoreViaQmp(dsock, image, { channels: 2, paused: true, multifdStallMs: 5000, connect: { commandTimeoutMs: 5000 } }).then(
        () => null,
        (e: Error) => e,
      );
      assert.ok(err, 'the restore fails');
      assert.match(err!.message, what);
      assert.match(err!.message, new RegExp(`-global migration\\.multifd-flush-after-each-section=${value}\\?\\); use --channels 1`));
      assert.ok(Date.now() - t0 < 40_000, `ended after ${Date.now() - t0} ms`);
      assert.equal(privateDirs(), tmpBefore, 'the private socket directory is removed');
    } finally {
      await dst.kill();
    }
  });
}

/** Runs the CLI, sends SIGINT when `when` resolves; resolves with its exit and how long it took after the signal. */
function cliInterrupted(args: string[], when: Promise<void>): Promise<{ code: number | null; stderr: string; afterSignalMs: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    let sentAt = 0;
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (t: string) => (stderr += t));
    void when.then(() => {
      sentAt = Date.now();
      child.kill('SIGINT');
    }, reject);
    const hung = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`qemu-snap ${args.join(' ')} hung: ${stderr}`));
    }, 90_000);
    child.on('close', (code) => {
      clearTimeout(hung);
      resolve({ code, stderr, afterSignalMs: sentAt ? Date.now() - sentAt : -1 });
    });
  });
}

test('SIGINT during a 4-channel restore into a stalled destination: exit 1 promptly with one line, nothing left behind', async () => {
  const dsock = snapSocket();
  const tmpBefore = privateDirs();
  const dst: Vm = await startVm(withSnapQmp({ memMiB: MEM_MIB, paused: true, incoming: 'defer', name: 'mfr-dst-sigint' }, dsock));
  let stopped = false;
  try {
    // Once the pages flow, QEMU is stopped (SIGSTOP): its channels fill and
    // qemu-snap waits on them; then the SIGINT.
    const flowing = (async () => {
      for (let i = 0; i < 600; i++) {
        const m = await dst.queryMigrate();
        if (m.status === 'active' || m.status === 'completed') break;
        await sleep(10);
      }
      process.kill(dst.pid, 'SIGSTOP');
      stopped = true;
      await sleep(500);
    })();
    const r = await cliInterrupted(['restore', '--paused', '--qmp', dsock, '--channels', '4', images.plain], flowing);
    assert.ok(r.afterSignalMs >= 0, 'the signal was sent before qemu-snap ended');
    assert.is(r.code, 1, r.stderr);
    assert.ok(isOneLineError(r.stderr), r.stderr);
    assert.match(r.stderr, /restore interrupted \(SIGINT\)/);
    assert.ok(r.afterSignalMs < 10_000, `ended ${r.afterSignalMs} ms after SIGINT`);
    assert.equal(privateDirs(), tmpBefore, 'the private socket directory is removed');
  } finally {
    if (stopped) process.kill(dst.pid, 'SIGCONT');
    await dst.stop();
  }
});

test.run();
