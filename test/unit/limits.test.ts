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
import * as zlib from 'node:zlib';
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

/**
 * Runs the CLI with a 64 MiB JavaScript heap; its peak RSS is the VmHWM of
 * its /proc/self/status at exit (QEMU_SNAP_STATS=1 prints it on stderr,
 * which is taken out of `stderr` here). A crash leaves it at -1.
 */
function cli(args: string[], input?: Buffer, stopAfterS?: number): Run {
  // stopAfterS: SIGTERM from timeout(1) (spawnSync's own timeout drops what the child writes after it).
  const argv = [process.execPath, '--max-old-space-size=64', CLI, ...args];
  if (stopAfterS !== undefined) argv.unshift('timeout', '-s', 'TERM', String(stopAfterS));
  const t = spawnSync(argv[0], argv.slice(1), {
    input: input ?? Buffer.alloc(0),
    timeout: 20_000,
    maxBuffer: 64 << 20,
    env: { ...process.env, QEMU_SNAP_STATS: '1' },
  });
  let rss = -1;
  const stderr = t.stderr
    .toString()
    .split('\n')
    .filter((line) => {
      const m = /^qemu-snap-stats: (.*)$/.exec(line);
      if (m) rss = Number((JSON.parse(m[1]) as { maxRssKiB: number }).maxRssKiB);
      return !m;
    })
    .join('\n');
  return { code: t.status, signal: t.signal, stdout: t.stdout, stderr, maxRssKiB: rss };
}

/** Far below any absurd size asked for, well above what the CLI needs to refuse. */
const RSS_LIMIT_KIB = 256 << 10;

function assertRssBounded(r: Run): void {
  // QEMU_SNAP_LIMITS_VERBOSE=1: the figures for docs/reliability.md.
  if (process.env.QEMU_SNAP_LIMITS_VERBOSE === '1') console.log(`  ${(r.maxRssKiB / 1024).toFixed(1)} MiB peak, exit ${r.code}: ${r.stderr.trim() || '(no message)'}`);
  assert.ok(r.maxRssKiB > 0 && r.maxRssKiB <= RSS_LIMIT_KIB, `peak RSS ${r.maxRssKiB} KiB`);
}

/** `expected`: the exact line (a string), or a pattern where the line holds a generated path. */
function assertRefused(r: Run, expected: RegExp | string): void {
  assert.is(r.signal, null, `killed by ${r.signal}: ${r.stderr}`);
  assert.is(r.code, 1, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.is(lines.length, 1, r.stderr);
  assert.ok(lines[0].startsWith('qemu-snap: '), r.stderr);
  assert.not.match(lines[0], /internal error/);
  if (typeof expected === 'string') assert.is(lines[0], expected);
  else assert.match(lines[0], expected);
  // load sends a consumer (here a socket) the refusal notice, save nothing.
  assert.ok(r.stdout.length === 0 || isRefusalNotice(r.stdout), 'nothing on stdout but the refusal notice');
  assertRssBounded(r);
}

function saveRefused(stream: Buffer, pattern: RegExp | string, extra: string[] = []): void {
  const sub = fs.mkdtempSync(path.join(dir, 'save-'));
  const r = cli(['save', '-q', ...extra, path.join(sub, 'vm.qcow2')], stream);
  assertRefused(r, pattern);
  assert.equal(fs.readdirSync(sub), [], 'no file left behind');
}

// ---- streams ----------------------------------------------------------------

test('MEM_SIZE with more than 1000 blocks', () => {
  const blocks = Array.from({ length: 1001 }, (_, i) => ({ id: `b${i}`, length: 4096 }));
  saveRefused(new StreamBuilder().header().configuration().sectionStart(2).memSize(blocks).build(), 'qemu-snap: bad stream at byte 43: more than 1000 RAM blocks in MEM_SIZE in section ram');
});

test('MEM_SIZE total above 16 TiB', () => {
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize([{ id: 'pc.ram', length: 2 ** 45 }]);
  saveRefused(b.build(), 'qemu-snap: bad stream at byte 43: absurd MEM_SIZE total 35184372088832 bytes (more than 16 TiB) in section ram');
});

test('RAM block length of 2^60', () => {
  const b = new StreamBuilder().header().configuration().sectionStart(2).raw(Buffer.from([0, 0, 0x10, 0, 0, 0, 0x10, 0x04]));
  b.raw(Buffer.from([6])).raw(Buffer.from('pc.ram')).raw(Buffer.from([0x10, 0, 0, 0, 0, 0, 0x10, 0]));
  saveRefused(b.build(), 'qemu-snap: bad stream at byte 43: absurd MEM_SIZE total 17592186048512 bytes (more than 16 TiB) in section ram');
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
  assertRssBounded(r);
  const info = cli(['info', '--json', path.join(sub, 'vm.qcow2')]);
  assert.is(info.code, 0, info.stderr);
  assert.is(JSON.parse(info.stdout.toString()).ramBlocks[0].length, 16 * 2 ** 40);
  // Loading it sends 2^35 ZERO records (hours): the bitmap of pages sent
  // grows with them, not with the claim. Stopped by SIGTERM after 3 s.
  const load = cli(['load', '-q', '-o', '/dev/null', path.join(sub, 'vm.qcow2')], undefined, 3);
  assert.is(load.code, 124, load.stderr); // timeout(1)'s status for a command it stopped
  assert.is(load.stderr.trim(), 'qemu-snap: load interrupted (SIGTERM)');
  assertRssBounded(load);
});

test('page size out of range in the configuration', () => {
  saveRefused(new StreamBuilder().header().configuration('pc', { pageBits: 30 }).build(), 'qemu-snap: bad stream at byte 15: target page bits 30 out of range 9..16 in CONFIGURATION');
  saveRefused(new StreamBuilder().header().configuration('pc', { pageBits: 8 }).build(), 'qemu-snap: bad stream at byte 15: target page bits 8 out of range 9..16 in CONFIGURATION');
});

test('machine name length 0xffffffff', () => {
  const b = new StreamBuilder().header().raw(Buffer.from([0x07, 0xff, 0xff, 0xff, 0xff]));
  saveRefused(b.build(), 'qemu-snap: bad stream at byte 9: absurd machine name length 4294967295 in CONFIGURATION');
});

test('capability count 0xffffffff', () => {
  const name = Buffer.from('configuration/capabilities');
  const b = new StreamBuilder().header().configuration('pc').raw(Buffer.concat([Buffer.from([0x05, name.length]), name, Buffer.from([0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff])]));
  saveRefused(b.build(), 'qemu-snap: bad stream at byte 15: absurd capability count 4294967295 in CONFIGURATION');
});

test('section ids: PART for a section never started, footer id 0xffffffff', () => {
  const part = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(0xffffffff);
  saveRefused(part.build(), 'qemu-snap: bad stream at byte 108: SECTION_PART for section id 4294967295, which was never started');
  const footer = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(0xffffffff);
  saveRefused(footer.build(), 'qemu-snap: bad stream at byte 103: mismatched section footer: id 4294967295, expected 2 in section ram');
});

test('idstr of 255 bytes naming no block', () => {
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2).sectionPart(2).page(0, 'x'.repeat(255));
  saveRefused(b.build(), `qemu-snap: bad stream at byte 113: RAM record for unknown block "${'x'.repeat(64)}…" in section ram`);
});

test('VMDESCRIPTION length 0xffffffff after EOF', () => {
  const whole = completeStream({ vmdesc: false });
  saveRefused(Buffer.concat([whole, Buffer.from([0x06, 0xff, 0xff, 0xff, 0xff])]), 'qemu-snap: bad stream at byte 21111: stream ends without a section footer and EOF after the device state (truncated?)');
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
  saveRefused(b.build(), 'qemu-snap: bad stream at byte 50331793: stream ends without a section footer and EOF after the device state (truncated?)');
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

function loadRefused(image: string, pattern: RegExp | string): void {
  assertRefused(cli(['load', '-q', image]), pattern);
  assertRefused(cli(['info', image]), pattern);
}

test('L1 size of 4M entries (32 MiB) in a small file', () => {
  const image = savedImage('l1.qcow2');
  const b = fs.readFileSync(image);
  b.writeUInt32BE(4 << 20, 36);
  fs.writeFileSync(image, b);
  loadRefused(image, `qemu-snap: ${image}: L1 table (4194304 entries at 0x30000) lies outside the file (589824 bytes) (at byte offset 40)`);
});

test('L1 size of 2^32-1 entries', () => {
  const image = savedImage('l1max.qcow2');
  const b = fs.readFileSync(image);
  b.writeUInt32BE(0xffffffff, 36);
  fs.writeFileSync(image, b);
  loadRefused(image, `qemu-snap: ${image}: L1 table too large: 4294967295 entries (at byte offset 36)`);
});

test('refcount table of 2^32-1 clusters', () => {
  const image = savedImage('rt.qcow2');
  const b = fs.readFileSync(image);
  b.writeUInt32BE(0xffffffff, 56);
  fs.writeFileSync(image, b);
  loadRefused(image, `qemu-snap: ${image}: refcount table too large: 4294967295 clusters (at byte offset 56)`);
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
  // load reads no refcounts; info counts them, each distinct block once.
  const load = cli(['load', '-q', '-o', path.join(dir, 'rtdup.out'), image]);
  assert.is(load.code, 0, load.stderr);
  assertRssBounded(load);
  assertRefused(cli(['info', image]), `qemu-snap: ${image}: refcount block 1 at 0x${firstBlock.toString(16)} is the same cluster as refcount block 0 (at byte offset ${at + 8})`);
});

test('STVM state length of 256 MiB in an image that holds a few KiB', () => {
  const image = savedImage('stvm.qcow2');
  const b = fs.readFileSync(image);
  const at = b.indexOf(Buffer.from('STVM'));
  assert.ok(at > 0);
  b.writeUInt32BE(256 << 20, at + 24);
  fs.writeFileSync(image, b);
  loadRefused(image, `qemu-snap: ${image}: STVM header: state length 268435456 reaches past the written VM state area (65536 bytes allocated)`);
});

test('STVM leader length of 4 GiB-1', () => {
  const image = savedImage('stvm2.qcow2');
  const b = fs.readFileSync(image);
  const at = b.indexOf(Buffer.from('STVM'));
  b.writeUInt32BE(0xffffffff, at + 20);
  b.writeUInt32BE(0xffffffff, at + 24);
  fs.writeFileSync(image, b);
  loadRefused(image, `qemu-snap: ${image}: STVM header: state length 4294967295 does not fit in the VM state area (268435484 bytes)`);
});

// ---- allocation budgets (issue 15) -------------------------------------------

/** The first data cluster's L2 entry of an image: [its file offset, the L2 entry's file offset]. */
function firstDataEntry(b: Buffer): number {
  const l1 = u64(b, 40);
  const l2 = u64(b, l1) % 2 ** 56 - (u64(b, l1) % 512);
  const cs = 2 ** b.readUInt32BE(20);
  for (let j = 0; j < cs / 8; j++) if (u64(b, l2 + 8 * j) !== 0) return l2 + 8 * j;
  throw new Error('no data cluster');
}

test('a compressed cluster that inflates to 1 GiB: refused after one cluster of output', () => {
  const image = savedImage('inflate.qcow2', '1M');
  const b = fs.readFileSync(image);
  const cs = 2 ** b.readUInt32BE(20);
  // 64 deflate pieces of 16 MiB of zeros each, full-flushed so that they
  // chain, with no final block: 1 GiB from ~1 MiB.
  const piece = zlib.deflateRawSync(Buffer.alloc(16 << 20), { level: 9, finishFlush: zlib.constants.Z_FULL_FLUSH });
  const data = Buffer.concat(Array.from({ length: 64 }, () => piece));
  const sectors = Math.ceil(data.length / 512);
  assert.ok(sectors <= 4096, `${sectors} sectors`);
  const at = Math.ceil(b.length / cs) * cs;
  const entry = firstDataEntry(b);
  const shift = 62 - (Math.log2(cs) - 8);
  // compressed flag | (sectors - 1) << shift | offset
  const hi = 2 ** 30 + (sectors - 1) * 2 ** (shift - 32) + Math.floor(at / 2 ** 32);
  b.writeUInt32BE(hi >>> 0, entry);
  b.writeUInt32BE(at % 2 ** 32, entry + 4);
  fs.writeFileSync(image, Buffer.concat([b, Buffer.alloc(at - b.length), data, Buffer.alloc(sectors * 512 - data.length)]));
  const msg = `qemu-snap: ${image}: compressed cluster inflates to more than the cluster size (${cs} bytes) (at byte offset ${at})`;
  assertRefused(cli(['load', '-q', '--no-verify', image]), msg);
  assertRefused(cli(['verify', image]), msg);
});

/** Moves an image's VM state to the L1 index a virtual size of `virtualSize` puts it at, and makes the digest count match. */
function hugeVirtualSize(name: string, virtualSize: number): string {
  const image = savedImage(name, '1M');
  const b = fs.readFileSync(image);
  const cs = 2 ** b.readUInt32BE(20);
  const l2Span = cs * (cs / 8);
  const oldIndex = Math.ceil(u64(b, 24) / l2Span);
  const newIndex = Math.ceil(virtualSize / l2Span);
  const l1 = u64(b, 40);
  assert.ok((newIndex + 1) * 8 <= cs, 'the L1 table keeps to its cluster');
  putU64(b, l1 + 8 * newIndex, u64(b, l1 + 8 * oldIndex));
  putU64(b, l1 + 8 * oldIndex, 0);
  b.writeUInt32BE(newIndex + 1, 36);
  putU64(b, 24, virtualSize);
  const qsdg = b.indexOf(Buffer.from('QSDG'));
  assert.ok(qsdg > 0);
  b.writeUInt32BE(Math.ceil(virtualSize / (1 << 20)), qsdg + 12);
  fs.writeFileSync(image, b);
  return image;
}

test('a digest table of 1 GiB (virtual size 256 TiB) in a small image: refused before it is read', () => {
  const image = hugeVirtualSize('digest-huge.qcow2', 2 ** 48);
  const size = fs.statSync(image).size;
  const msg = `qemu-snap: ${image}: the RAM digest table (${2 ** 30} bytes) is larger than the file (${size} bytes)`;
  assertRefused(cli(['info', image]), msg);
  assertRefused(cli(['load', '-q', image]), msg);
});

test('a digest table of 4 MiB (virtual size 1 TiB) that the file could hold but the VM state area does not', () => {
  const image = hugeVirtualSize('digest-big.qcow2', 2 ** 40);
  assertRefused(cli(['info', image]), new RegExp(`^qemu-snap: ${image.replace(/[.]/g, '\\.')}: the RAM digest table reaches past the written VM state area \\(\\d+ bytes needed, \\d+ allocated\\)$`));
});

test('a refcount table naming 16384 blocks in a sparse 1 GiB file: info and load read none of them into memory', () => {
  const image = savedImage('sparse-rt.qcow2');
  const b = fs.readFileSync(image);
  const cs = 2 ** b.readUInt32BE(20);
  const apparent = 1 << 30;
  const blocks = apparent / cs;
  const table = Buffer.alloc(blocks * 8);
  const at = Math.ceil(b.length / cs) * cs;
  // The table's own clusters, then one block per cluster of the (sparse) rest of the file.
  const first = at + table.length;
  for (let i = 0; i < blocks; i++) putU64(table, i * 8, first + i * cs < apparent ? first + i * cs : 0);
  putU64(b, 48, at);
  b.writeUInt32BE(table.length / cs, 56);
  fs.writeFileSync(image, Buffer.concat([b, Buffer.alloc(at - b.length), table]));
  fs.truncateSync(image, apparent);
  const info = cli(['info', '--json', image]);
  assert.is(info.code, 0, info.stderr);
  assertRssBounded(info);
  const load = cli(['load', '-q', '-o', path.join(dir, 'sparse-rt.out'), image]);
  assert.is(load.code, 0, load.stderr);
  assertRssBounded(load);
});

test.run();
