// The RFC's command line, `qemu-snap [OPTIONS] save|load FILE` with the
// options before the command, as QEMU's exec: runs it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, requireQemu, makePattern, shellQuote, compareRange, sleep } from './lib';
import { CLI, runCli, tempDir, isOneLineError } from './common';

const dir = tempDir('rfc');
const MEM_MIB = 256;
const PAT_ADDR = 16 << 20;
const PAT_SIZE = 64 << 20;
const pattern = path.join(dir, 'pattern.bin');
const image = path.join(dir, 'vm.qcow2');

/** exec: body running qemu-snap with raw (already quoted) arguments, its exit code and stderr kept. */
function rfcExec(args: string, tag: string): string {
  const err = path.join(dir, `${tag}.err`);
  return `exec:${shellQuote(process.execPath)} ${shellQuote(CLI)} ${args} 2>${shellQuote(err)}; echo $? > ${shellQuote(err)}.rc`;
}

async function outcome(tag: string): Promise<{ code: string; stderr: string }> {
  const err = path.join(dir, `${tag}.err`);
  for (let i = 0; i < 200 && !fs.existsSync(`${err}.rc`); i++) await sleep(50);
  return { code: fs.readFileSync(`${err}.rc`, 'utf8').trim(), stderr: fs.readFileSync(err, 'utf8') };
}

test.before(() => {
  requireQemu();
  makePattern(pattern, PAT_SIZE, 5);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('qemu-snap -V and --version print the package version; -h prints the usage', async () => {
  const version = JSON.parse(fs.readFileSync(path.resolve(__dirname, '..', '..', '..', 'package.json'), 'utf8')).version as string;
  for (const flag of ['-V', '--version']) {
    const r = await runCli([flag]);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout.toString(), `qemu-snap ${version}\n`);
  }
  const h = await runCli(['-h']);
  assert.is(h.code, 0);
  assert.match(h.stdout.toString(), /qemu-snap \[-s SIZE\] \[-S SIZE\] \[-p PCT\]/);
  const bad = await runCli(['-p', '10', 'save', path.join(dir, 'never.qcow2')]);
  assert.is(bad.code, 2, 'save has no -p');
  assert.ok(fs.readdirSync(dir).every((f) => !f.startsWith('never')));
});

test('migrate "exec:qemu-snap -s 1G save FILE" from a running VM', async () => {
  const vm = await startVm({ memMiB: MEM_MIB, paused: false, loads: [{ file: pattern, addr: PAT_ADDR }], name: 'rfc-src' });
  try {
    await vm.migrate(rfcExec(`-s 1G save ${shellQuote(image)}`, 'save'), { capabilities: { 'return-path': true } });
  } finally {
    await vm.stop();
  }
  const o = await outcome('save');
  assert.is(o.code, '0', o.stderr);
  assert.ok(fs.existsSync(image));
});

test('-s smaller than the guest RAM: the stream is refused, QEMU sees the failure, no file', async () => {
  const small = path.join(dir, 'small.qcow2');
  const vm = await startVm({ memMiB: MEM_MIB, name: 'rfc-small' });
  try {
    await vm.startMigration(rfcExec(`-s 128M save ${shellQuote(small)}`, 'small'), { capabilities: { 'return-path': true } });
    await vm.waitForMigrationStatus('failed', 30_000);
  } finally {
    await vm.stop();
  }
  const o = await outcome('small');
  assert.is(o.code, '1');
  assert.ok(isOneLineError(o.stderr), o.stderr);
  assert.match(o.stderr, /larger than the image size limit .*-s\/--image-size/);
  assert.not.ok(fs.existsSync(small));
  assert.ok(fs.readdirSync(dir).every((f) => !f.startsWith('.small')), 'no temporary file left');
});

test('-incoming "exec:qemu-snap -S 4096 load FILE" (precopy)', async () => {
  const dst = await startVm({ memMiB: MEM_MIB, incoming: rfcExec(`-S 4096 load ${shellQuote(image)}`, 'load'), name: 'rfc-load' });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    const dump = path.join(dir, 'load.mem');
    await dst.pmemsave(dump, PAT_SIZE, PAT_ADDR);
    assert.is(compareRange(dump, 0, fs.readFileSync(pattern)), -1);
  } finally {
    await dst.stop();
  }
  assert.is((await outcome('load')).code, '0');
});

test('migrate_incoming "exec:qemu-snap -p 10 load FILE" (postcopy)', async () => {
  const dst = await startVm({ memMiB: MEM_MIB, incoming: 'defer', name: 'rfc-postcopy' });
  try {
    await dst.migrateIncoming(rfcExec(`-p 10 load ${shellQuote(image)}`, 'postcopy'), { 'postcopy-ram': true });
    await dst.waitForMigrationStatus('completed', 60_000);
    assert.ok(dst.migrationStatusSeen.has('postcopy-active'), `statuses: ${[...dst.migrationStatusSeen.keys()].join(', ')}`);
    const dump = path.join(dir, 'postcopy.mem');
    await dst.pmemsave(dump, PAT_SIZE, PAT_ADDR);
    assert.is(compareRange(dump, 0, fs.readFileSync(pattern)), -1);
  } finally {
    await dst.stop();
  }
  assert.is((await outcome('postcopy')).code, '0');
});

test('qemu-snap -S 8192 load FILE refuses an image of 4096-byte pages; -s 128M load refuses a bigger image', async () => {
  const r = await runCli(['-S', '8192', 'load', '-o', path.join(dir, 'x.stream'), image]);
  assert.is(r.code, 1);
  assert.ok(isOneLineError(r.stderr), r.stderr);
  assert.match(r.stderr, /4096-byte pages, 8192 were asked for/);
  const s = await runCli(['-s', '128M', 'load', '-o', path.join(dir, 'y.stream'), image]);
  assert.is(s.code, 1);
  assert.match(s.stderr, /larger than the image size limit/);
});

test('--progress works for info and verify too', async () => {
  const streamFile = path.join(dir, 'progress.stream');
  const l = await runCli(['load', '-q', '-o', streamFile, image]);
  assert.is(l.code, 0, l.stderr);
  const v = await runCli(['verify', '--progress', image]);
  assert.is(v.code, 0, v.stderr);
  // The closing line of a forced progress display (stderr is not a terminal here).
  assert.match(v.stderr, /(^|[\r\n])verify: [\d.]+ MiB of [\d.]+ MiB RAM \(100%\), \d+ data pages/);
  assert.match(v.stderr, /ok: \d+ RAM chunks/);
  const i = await runCli(['info', '--progress', '--json', streamFile]);
  assert.is(i.code, 0, i.stderr);
  // A small stream is read before the first update is due: a line, if any, is info's and is cleared.
  for (const line of i.stderr.toString().split(/[\r\n]+/).filter((x) => x.trim() !== '')) assert.match(line, /^info: [\d.]+ [KMG]?i?B of input/);
  assert.is(JSON.parse(i.stdout.toString()).kind, 'stream');
  const quiet = await runCli(['info', '--no-progress', streamFile]);
  assert.is(quiet.stderr, '');
});

test.run();
