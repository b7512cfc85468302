// Issue 17 against real QEMU: what a new user hits on the failure paths.
// A refused image must make the destination QEMU fail at once (it waits for
// ever on an empty stream), a destination that closes the stream must be
// named as such, and the messages must name the right thing.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { startVm, makePattern, patternBytes, requireQemu, shellQuote, Machine, Vm } from './lib';
import { CLI, runCli, snapExec, tempDir, isOneLineError } from './common';
import { REFUSAL_NOTICE } from '../../src/snapshot/refusal';

const dir = tempDir('first-hour');
const pattern = path.join(dir, 'pattern.bin');
const PATTERN_BYTES = 32 << 20;
const PATTERN_ADDR = 16 << 20;
const image = path.join(dir, 'vm.qcow2');
/** Generous: QEMU fails within a second here; the point is that it does not hang. */
const FAIL_WITHIN_MS = 15_000;

test.before(async () => {
  requireQemu();
  makePattern(pattern, PATTERN_BYTES, 41);
  // 128 MiB with 32 MiB of data: more stream than the pipes between us and
  // QEMU hold, so a destination that gives up is seen as a closed pipe.
  const vm = await startVm({ machine: 'pc', memMiB: 128, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'first-hour-src' });
  try {
    await vm.migrate(snapExec(`save -q ${shellQuote(image)}`));
  } finally {
    await vm.stop();
  }
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

/**
 * Starts a destination on `incoming` and waits for it to give up: exit, or
 * a `failed` migration. Returns its stderr (which holds qemu-snap's too).
 */
async function destinationGivesUp(incoming: string, opts: { machine?: Machine; memMiB?: number } = {}): Promise<{ stderr: string; ms: number }> {
  const t0 = Date.now();
  const vm: Vm = await startVm({ machine: opts.machine ?? 'pc', memMiB: opts.memMiB ?? 128, incoming, name: 'first-hour-dst' });
  try {
    let status = '';
    while (!vm.hasExited && Date.now() - t0 < FAIL_WITHIN_MS) {
      try {
        status = (await vm.queryMigrate()).status ?? '';
      } catch {
        // QMP goes away as QEMU exits
      }
      if (status === 'failed' || status === 'completed') break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(vm.hasExited || status === 'failed', `the destination neither exited nor failed within ${FAIL_WITHIN_MS} ms (status '${status}'); stderr: ${vm.stderr}`);
    // The exec: child may still be writing its line to QEMU's stderr.
    await vm.waitExit(2000);
    return { stderr: vm.stderr, ms: Date.now() - t0 };
  } finally {
    await vm.stop();
  }
}

test('load of a file that is no image: the destination QEMU fails at once ("Not a migration stream")', async () => {
  const r = await destinationGivesUp(snapExec('load -q /etc/passwd'));
  assert.match(r.stderr, /Not a migration stream/);
  assert.match(r.stderr, /qemu-snap: \/etc\/passwd: not a qcow2 image/);
});

test('load of an image with a damaged header: the destination fails at once', async () => {
  const damaged = path.join(dir, 'bad-header.qcow2');
  const data = fs.readFileSync(image);
  const at = data.indexOf(Buffer.from('STVM'));
  assert.ok(at > 0, 'the STVM header is in the image');
  data[at] ^= 0xff;
  fs.writeFileSync(damaged, data);
  const r = await destinationGivesUp(snapExec(`load -q ${shellQuote(damaged)}`));
  assert.match(r.stderr, /Not a migration stream/);
  assert.match(r.stderr, /qemu-snap: .*bad-header\.qcow2/);
  fs.unlinkSync(damaged);
});

test('a usage error under exec: also makes the destination fail at once', async () => {
  const r = await destinationGivesUp(snapExec(`load --bogus ${shellQuote(image)}`));
  assert.match(r.stderr, /Not a migration stream/);
  assert.match(r.stderr, /qemu-snap: unknown option --bogus/);
});

test('RAM damaged mid-image: load stops mid-stream and the destination does not hang', async () => {
  const damaged = path.join(dir, 'bad-ram.qcow2');
  const data = fs.readFileSync(image);
  const at = data.indexOf(patternBytes(PATTERN_BYTES, 41).subarray(20 << 20, (20 << 20) + 256));
  assert.ok(at > 0, 'the pattern is in the image');
  data[at + 100] ^= 0x01;
  fs.writeFileSync(damaged, data);
  const r = await destinationGivesUp(snapExec(`load -q ${shellQuote(damaged)}`));
  assert.match(r.stderr, /qemu-snap: .*RAM digest mismatch/);
  fs.unlinkSync(damaged);
});

test('a destination with another -m closes the stream: qemu-snap says so and where the reason is', async () => {
  const r = await destinationGivesUp(snapExec(`load -q ${shellQuote(image)}`), { memMiB: 256 });
  assert.match(r.stderr, /Size mismatch/);
  assert.match(r.stderr, /qemu-snap: the destination closed the stream after .* \(EPIPE on stdout\): a destination QEMU logs its reason on its stderr/);
  assert.not.match(r.stderr, /fd 1: the reader closed the pipe/);
});

test('a destination with another machine type closes the stream: the same message', async () => {
  const r = await destinationGivesUp(snapExec(`load -q ${shellQuote(image)}`), { machine: 'q35' });
  assert.match(r.stderr, /Machine type received is/);
  assert.match(r.stderr, /qemu-snap: the destination closed the stream after/);
});

test('the consumer of a shell pipeline gets the refusal notice; a file gets nothing', async () => {
  const out = path.join(dir, 'consumer.out');
  const err = path.join(dir, 'consumer.err');
  const cli = `${shellQuote(process.execPath)} ${shellQuote(CLI)}`;
  const code = execFileSync('bash', ['-c', `${cli} load /etc/passwd 2>${shellQuote(err)} | cat > ${shellQuote(out)}; echo "\${PIPESTATUS[0]}"`], { encoding: 'utf8' });
  assert.is(code.trim(), '1');
  assert.ok(fs.readFileSync(out).equals(REFUSAL_NOTICE), 'a pipe consumer gets the notice');
  assert.ok(isOneLineError(fs.readFileSync(err, 'utf8')));
  const fileCode = spawnSync('bash', ['-c', `${cli} load /etc/passwd > ${shellQuote(out)} 2>/dev/null`]).status;
  assert.is(fileCode, 1);
  assert.is(fs.statSync(out).size, 0, 'stdout redirected to a file gets nothing');
});

test('load DIR names the path', async () => {
  const r = await runCli(['load', dir]);
  assert.is(r.code, 1);
  assert.ok(isOneLineError(r.stderr), r.stderr);
  assert.ok(r.stderr.includes(`${dir}: is a directory, not a snapshot image`), r.stderr);
});

test('--postcopy to a file is a usage error, with nothing written', async () => {
  const out = path.join(dir, 'postcopy.stream');
  const r = await runCli(['load', '--postcopy', '10', '-o', out, image]);
  assert.is(r.code, 2, r.stderr);
  assert.match(r.stderr, /--postcopy needs the destination QEMU on stdout/);
  assert.not.ok(fs.existsSync(out), 'no file was created');
  const cli = `${shellQuote(process.execPath)} ${shellQuote(CLI)}`;
  const redirected = spawnSync('bash', ['-c', `${cli} load --postcopy 10 ${shellQuote(image)} > ${shellQuote(out)}`], { encoding: 'utf8' });
  assert.is(redirected.status, 2, redirected.stderr);
  assert.match(redirected.stderr, /stdout is a file/);
  assert.is(fs.statSync(out).size, 0, 'nothing written to the file stdout names');
});

test('save with a terminal on stdin refuses at once', async () => {
  const target = path.join(dir, 'tty.qcow2');
  const cli = `${shellQuote(process.execPath)} ${shellQuote(CLI)}`;
  // script(1) gives the command a pseudo-terminal on stdin, stdout and stderr.
  const r = spawnSync('script', ['-qec', `${cli} save ${shellQuote(target)}`, '/dev/null'], { encoding: 'utf8', timeout: 20_000, input: '' });
  assert.is(r.status, 2, `${r.stdout} ${r.stderr}`);
  assert.match(r.stdout, /refusing to read a migration stream from a terminal/);
  assert.not.ok(fs.existsSync(target));
});

test('info prints a restore recipe a destination can be started from (DIMM, -smp 2, slots)', async () => {
  const dimmImage = path.join(dir, 'dimm.qcow2');
  const srcDump = path.join(dir, 'dimm.src.mem');
  const dstDump = path.join(dir, 'dimm.dst.mem');
  const extra = ['-m', '256M,slots=3,maxmem=1G', '-smp', '2', '-object', 'memory-backend-ram,id=dimm0,size=64M', '-device', 'pc-dimm,memdev=dimm0'];
  const src = await startVm({ machine: 'pc', memMiB: 256, extraArgs: extra, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'recipe-src' });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(dimmImage)}`));
    await src.pmemsave(srcDump, 256 << 20);
  } finally {
    await src.stop();
  }
  const info = await runCli(['info', '--json', dimmImage]);
  assert.is(info.code, 0, info.stderr);
  const recipe = JSON.parse(info.stdout.toString()).restore;
  assert.match(recipe.machine, /^pc-i440fx-\d/);
  assert.equal(recipe.mainRam, { id: 'pc.ram', bytes: 256 << 20 });
  assert.equal(recipe.memoryBackends, [{ id: 'dimm0', bytes: 64 << 20 }]);
  assert.is(recipe.cpus, 2);
  assert.is(recipe.slots, 3);
  const text = await runCli(['info', dimmImage]);
  assert.ok(text.stdout.toString().includes(recipe.commandLine), 'the text output carries the same command line');
  // The destination runs the recipe as it is (startVm's own -machine and -m come first and are overridden).
  const argv: string[] = recipe.argv.slice(1);
  const at = argv.indexOf('-incoming');
  assert.ok(at > 0 && /^exec:qemu-snap load /.test(argv[at + 1]));
  argv.splice(at, 2);
  const dst = await startVm({ machine: 'pc', memMiB: 256, extraArgs: argv, incoming: snapExec(`load -q ${shellQuote(dimmImage)}`), name: 'recipe-dst' });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await dst.pmemsave(dstDump, 256 << 20);
  } finally {
    await dst.stop();
  }
  assert.ok(execFileSync('cmp', [srcDump, dstDump]).length === 0, 'guest RAM restored');
  for (const f of [dimmImage, srcDump, dstDump]) fs.unlinkSync(f);
});

test('progress under QEMU (stderr not a terminal): plain lines with RAM covered of RAM total and the page counts', async () => {
  const img = path.join(dir, 'progress.qcow2');
  const src = await startVm({ machine: 'pc', memMiB: 256, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'progress-src' });
  let saveErr = '';
  try {
    await src.migrate(snapExec(`save --progress ${shellQuote(img)}`));
    // Without a return path QEMU says completed before save has published (and printed): wait for it.
    for (let i = 0; i < 200 && !/qemu-snap: saved /.test(src.stderr); i++) await new Promise((r) => setTimeout(r, 50));
    saveErr = src.stderr;
  } finally {
    await src.stop();
  }
  const saveLine = saveErr.split('\n').find((l) => l.startsWith('save: ')) ?? '';
  // 256 MiB of guest RAM plus the ROMs and BIOS blocks; every page covered.
  assert.match(saveLine, /^save: 25\d MiB of 25\d MiB RAM \(100%\), \d+ data pages, \d+ zero, \d+ re-sent, .*\/s, .* in \d+\.\d s$/);
  const data = Number(/(\d+) data pages/.exec(saveLine)?.[1]);
  assert.ok(data >= PATTERN_BYTES / 4096, saveLine);
  const dst = await startVm({ machine: 'pc', memMiB: 256, incoming: snapExec(`load --progress ${shellQuote(img)}`), name: 'progress-dst' });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
  } finally {
    await dst.stop();
  }
  const loadLine = dst.stderr.split('\n').find((l) => l.startsWith('load: ')) ?? '';
  assert.match(loadLine, new RegExp(`^load: 25\\d MiB of 25\\d MiB RAM \\(100%\\), ${data} of ${data} data pages, \\d+ zero, .*/s, .* in \\d+\\.\\d s$`));
  for (const text of [saveErr, dst.stderr]) assert.not.match(text, /[\r\x1b]/, 'no carriage returns or escapes in a log');
  fs.unlinkSync(img);
});

test('with the return-path capability, "completed" on the source means the image is published', async () => {
  const img = path.join(dir, 'return-path.qcow2');
  const src = await startVm({ machine: 'pc', memMiB: 256, paused: false, loads: [{ file: pattern, addr: PATTERN_ADDR }], name: 'rp-src' });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(img)}`), { capabilities: { 'return-path': true } });
    // No waiting: save answers SHUT only after the fsync and the rename.
    assert.ok(fs.existsSync(img), 'the image exists when the source reports completed');
    assert.is((await src.queryStatus()).status, 'postmigrate', 'the source is left paused');
    await src.cont();
    assert.is((await src.queryStatus()).status, 'running', 'cont resumes it (as the README says)');
  } finally {
    await src.stop();
  }
  const v = await runCli(['verify', img]);
  assert.is(v.code, 0, v.stderr);
  fs.unlinkSync(img);
});

test.run();
