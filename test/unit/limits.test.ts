// Input limits: absurd counts, lengths and sizes in streams and images are
// refused with one line before they make the CLI allocate memory for them.
// The compiled CLI runs as a child with a 64 MiB JavaScript heap, and its
// resident memory is watched, so that an allocation of the absurd size shows
// up as a crash or as growth rather than passing unnoticed.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { StreamBuilder, BLOCKS, completeStream } from './synthetic-stream';
import { isRefusalNotice } from '../../src/snapshot/refusal';

const CLI = path.resolve(__dirname, '..', '..', 'cli', 'qemu-snap.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-limits-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

interface Run {
  code: number | null;
  signal: string | null;
  stdout: Buffer;
  stderr: string;
  /** Peak resident set of the CLI process, KiB. */
  maxRssKiB: number;
}

// Preloaded into the CLI: records its peak RSS when it exits, however it exits.
const rssFile = path.join(dir, 'rss');
const preload = path.join(dir, 'rss-preload.js');
fs.writeFileSync(preload, `process.on('exit', () => require('fs').writeFileSync(${JSON.stringify(rssFile)}, String(process.resourceUsage().maxRSS)));\n`);

/** Runs the CLI with a 64 MiB JavaScript heap and reports its peak RSS. */
function cli(args: string[], input?: Buffer): Run {
  fs.rmSync(rssFile, { force: true });
  const t = spawnSync(process.execPath, ['--max-old-space-size=64', '-r', preload, CLI, ...args], {
    input: input ?? Buffer.alloc(0),
    timeout: 20_000,
    maxBuffer: 64 << 20,
  });
  const rss = fs.existsSync(rssFile) ? Number(fs.readFileSync(rssFile, 'utf8')) : -1;
  return { code: t.status, signal: t.signal, stdout: t.stdout, stderr: t.stderr.toString(), maxRssKiB: rss };
}

/** Far below any absurd size asked for, well above what the CLI needs to refuse. */
const RSS_LIMIT_KIB = 200 << 10;

function assertRefused(r: Run, pattern: RegExp): void {
  assert.is(r.signal, null, `killed by ${r.signal}: ${r.stderr}`);
  assert.is(r.code, 1, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.is(lines.length, 1, r.stderr);
  assert.ok(lines[0].startsWith('qemu-snap: '), r.stderr);
  assert.not.match(lines[0], /internal error/);
  assert.match(lines[0], pattern);
  // load sends a consumer (here a socket) the refusal notice, save nothing.
  assert.ok(r.stdout.length === 0 || isRefusalNotice(r.stdout), 'nothing on stdout but the refusal notice');
  assert.ok(r.maxRssKiB > 0 && r.maxRssKiB < RSS_LIMIT_KIB, `peak RSS ${r.maxRssKiB} KiB`);
}

function saveRefused(stream: Buffer, pattern: RegExp, extra: string[] = []): void {
  const sub = fs.mkdtempSync(path.join(dir, 'save-'));
  const r = cli(['save', '-q', ...extra, path.join(sub, 'vm.qcow2')], stream);
  assertRefused(r, pattern);
  assert.equal(fs.readdirSync(sub), [], 'no file left behind');
}

// ---- streams ----------------------------------------------------------------

test('MEM_SIZE with more than 1000 blocks', () => {
  const blocks = Array.from({ length: 1001 }, (_, i) => ({ id: `b${i}`, length: 4096 }));
  saveRefused(new StreamBuilder().header().configuration().sectionStart(2).memSize(blocks).build(), /more than 1000 RAM blocks/);
});

test('MEM_SIZE total above 16 TiB', () => {
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize([{ id: 'pc.ram', length: 2 ** 45 }]);
  saveRefused(b.build(), /absurd MEM_SIZE total/);
});

test('RAM block length of 2^60', () => {
  const b = new StreamBuilder().header().configuration().sectionStart(2).raw(Buffer.from([0, 0, 0x10, 0, 0, 0, 0x10, 0x04]));
  b.raw(Buffer.from([6])).raw(Buffer.from('pc.ram')).raw(Buffer.from([0x10, 0, 0, 0, 0, 0, 0x10, 0]));
  saveRefused(b.build(), /absurd/);
});

test('16 TiB of RAM in 512-byte pages is a legal stream: saved with bounded memory, quickly', () => {
  // Per-page bitmaps for 2^35 pages are allocated but never touched: the
  // resident set must stay small, and the image must be valid.
  const b = new StreamBuilder(512).header().configuration('pc', { pageBits: 9 }).sectionStart(2).memSize([{ id: 'pc.ram', length: 16 * 2 ** 40 }]);
  b.eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1, 2, 3])).eof();
  const sub = fs.mkdtempSync(path.join(dir, 'save-'));
  const t0 = Date.now();
  const r = cli(['save', '-q', path.join(sub, 'vm.qcow2')], b.build());
  assert.is(r.code, 0, r.stderr);
  assert.ok(Date.now() - t0 < 10_000, `took ${Date.now() - t0} ms`);
  assert.ok(r.maxRssKiB > 0 && r.maxRssKiB < RSS_LIMIT_KIB, `peak RSS ${r.maxRssKiB} KiB`);
  const info = cli(['info', '--json', path.join(sub, 'vm.qcow2')]);
  assert.is(info.code, 0, info.stderr);
  assert.is(JSON.parse(info.stdout.toString()).ramBlocks[0].length, 16 * 2 ** 40);
});

test('page size out of range in the configuration', () => {
  saveRefused(new StreamBuilder().header().configuration('pc', { pageBits: 30 }).build(), /target page bits 30/);
  saveRefused(new StreamBuilder().header().configuration('pc', { pageBits: 8 }).build(), /target page bits 8/);
});

test('machine name length 0xffffffff', () => {
  const b = new StreamBuilder().header().raw(Buffer.from([0x07, 0xff, 0xff, 0xff, 0xff]));
  saveRefused(b.build(), /absurd machine name length/);
});

test('capability count 0xffffffff', () => {
  const name = Buffer.from('configuration/capabilities');
  const b = new StreamBuilder().header().configuration('pc').raw(Buffer.concat([Buffer.from([0x05, name.length]), name, Buffer.from([0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff])]));
  saveRefused(b.build(), /absurd capability count/);
});

test('section ids: PART for a section never started, footer id 0xffffffff', () => {
  const part = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(0xffffffff);
  saveRefused(part.build(), /section id 4294967295, which was never started/);
  const footer = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(0xffffffff);
  saveRefused(footer.build(), /mismatched section footer/);
});

test('idstr of 255 bytes naming no block', () => {
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(2).page(0, 'x'.repeat(255));
  saveRefused(b.build(), /unknown block/);
});

test('VMDESCRIPTION length 0xffffffff after EOF', () => {
  const whole = completeStream({ vmdesc: false });
  saveRefused(Buffer.concat([whole, Buffer.from([0x06, 0xff, 0xff, 0xff, 0xff])]), /truncated|VMDESCRIPTION|footer/);
});

test('device state that never ends: bounded memory, refused at EOF', () => {
  // 48 MiB of device "state" full of tail look-alikes with absurd lengths:
  // the framer must not hold it all back.
  const unit = Buffer.from([0x7e, 0, 0, 0, 3, 0x00, 0x06, 0x03, 0xff, 0xff, 0xff, 0x7b]);
  const body = Buffer.alloc(48 << 20);
  for (let i = 0; i + unit.length <= body.length; i += unit.length) unit.copy(body, i);
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionEnd(2).eos().footer(2);
  b.sectionStart(3, 'timer', 0, 1, 0x04).raw(body);
  const t0 = Date.now();
  saveRefused(b.build(), /truncated|footer/);
  // The tail search over the held-back bytes was quadratic: a minute here.
  assert.ok(Date.now() - t0 < 10_000, `took ${Date.now() - t0} ms`);
});

// ---- images -----------------------------------------------------------------

/** A valid image saved from the synthetic stream by the CLI itself. */
function savedImage(name: string, clusterSize = '64K'): string {
  const image = path.join(dir, name);
  const r = spawnSync(process.execPath, [CLI, 'save', '-q', '--cluster-size', clusterSize, image], { input: completeStream() });
  assert.is(r.status, 0, r.stderr.toString());
  return image;
}

function u64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 2 ** 32 + b.readUInt32BE(at + 4);
}
function putU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 2 ** 32), at);
  b.writeUInt32BE(v % 2 ** 32, at + 4);
}

function loadRefused(image: string, pattern: RegExp): void {
  assertRefused(cli(['load', '-q', image]), pattern);
  assertRefused(cli(['info', image]), pattern);
}

test('L1 size of 4M entries (32 MiB) in a small file', () => {
  const image = savedImage('l1.qcow2');
  const b = fs.readFileSync(image);
  b.writeUInt32BE(4 << 20, 36);
  fs.writeFileSync(image, b);
  loadRefused(image, /L1 table \(4194304 entries .* lies outside the file/);
});

test('L1 size of 2^32-1 entries', () => {
  const image = savedImage('l1max.qcow2');
  const b = fs.readFileSync(image);
  b.writeUInt32BE(0xffffffff, 36);
  fs.writeFileSync(image, b);
  loadRefused(image, /L1 table too large/);
});

test('refcount table of 2^32-1 clusters', () => {
  const image = savedImage('rt.qcow2');
  const b = fs.readFileSync(image);
  b.writeUInt32BE(0xffffffff, 56);
  fs.writeFileSync(image, b);
  loadRefused(image, /refcount table too large/);
});

test('refcount table of 8 MiB whose million entries all name one block', () => {
  const image = savedImage('rtdup.qcow2');
  const b = fs.readFileSync(image);
  const cs = 2 ** b.readUInt32BE(20);
  const rtOffset = u64(b, 48);
  const firstBlock = u64(b, rtOffset);
  assert.ok(firstBlock > 0 && firstBlock % cs === 0);
  // Move the table to the end of the file and make it 8 MiB, every entry the same block.
  const at = Math.ceil(b.length / cs) * cs;
  const table = Buffer.alloc(8 << 20);
  for (let i = 0; i < table.length; i += 8) putU64(table, i, firstBlock);
  putU64(b, 48, at);
  b.writeUInt32BE(table.length / cs, 56);
  fs.writeFileSync(image, Buffer.concat([b, Buffer.alloc(at - b.length), table]));
  loadRefused(image, /refcount block 1 .*(same|also|twice|again)/);
});

test('STVM state length of 256 MiB in an image that holds a few KiB', () => {
  const image = savedImage('stvm.qcow2');
  const b = fs.readFileSync(image);
  const at = b.indexOf(Buffer.from('STVM'));
  assert.ok(at > 0);
  b.writeUInt32BE(256 << 20, at + 24);
  fs.writeFileSync(image, b);
  loadRefused(image, /state length 268435456 .*(VM state area|allocated|holds)/);
});

test('STVM leader length of 4 GiB-1', () => {
  const image = savedImage('stvm2.qcow2');
  const b = fs.readFileSync(image);
  const at = b.indexOf(Buffer.from('STVM'));
  b.writeUInt32BE(0xffffffff, at + 20);
  b.writeUInt32BE(0xffffffff, at + 24);
  fs.writeFileSync(image, b);
  loadRefused(image, /STVM header: state length 4294967295 does not fit/);
});

test.run();
