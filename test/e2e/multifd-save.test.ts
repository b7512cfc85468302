// Issue 18 against real QEMU: `save --qmp SOCKET --channels N` takes RAM over
// QEMU's multifd channels (a unix socket of ours) into the one ring, and the
// image restores with a plain `load`, the same image whatever N was.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as os from 'node:os';
import { spawn } from 'node:child_process';
import { startVm, requireQemu, makePattern, diffRanges, Vm, VmOptions } from './lib';
import { CLI, runCli, snapExec, tempDir, isOneLineError, CliResult } from './common';
import { shellQuote } from './lib';
import { openSnapshot } from '../../src/snapshot/snapshot-image';

const dir = tempDir('multifd-save');
const MEM_MIB = 256;
const PAT_ADDR = 32 << 20;
const PAT_SIZE = 96 << 20;
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, PAT_SIZE, 18);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

let sockCounter = 0;
function snapSocket(): string {
  return path.join(dir, `snap-${++sockCounter}.sock`);
}

function withSnapQmp(opts: VmOptions, sock: string): VmOptions {
  return { ...opts, extraArgs: [...(opts.extraArgs ?? []), '-qmp', `unix:${sock},server=on,wait=off`] };
}

async function settings(vm: Vm): Promise<unknown> {
  return { caps: await vm.qmp.execute('query-migrate-capabilities'), params: await vm.qmp.execute('query-migrate-parameters') };
}

/** Differences outside 0xA0000-0xFFFFF (kvmvapic rewrites bytes there on every incoming migration). */
function differsOutsideBios(a: string, b: string): string | null {
  const ranges = diffRanges(a, b, 16, 0).filter(([s, e]) => e <= 0xa0000 || s >= 0x100000);
  return ranges.length ? ranges.map(([s, e]) => `0x${s.toString(16)}..0x${e.toString(16)}`).join(', ') : null;
}

/** Restores `image` with a plain `load` into a -S VM and dumps its RAM. */
async function loadAndDump(image: string, dump: string, tag: string): Promise<void> {
  const dst = await startVm({ memMiB: MEM_MIB, paused: true, incoming: snapExec(`load -q ${shellQuote(image)}`), name: `multifd-dst-${tag}` });
  try {
    await dst.waitForMigrationStatus('completed', 60_000);
    await dst.pmemsave(dump, MEM_MIB << 20);
  } finally {
    await dst.stop();
  }
}

const images = new Map<number, string>();

/** qemu-snap's private migration socket directories in the temp dir. */
function privateDirs(): string[] {
  return fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith('qemu-snap-mig-')).sort();
}

for (const channels of [1, 2, 4]) {
  test(`save --qmp --channels ${channels} of a paused VM: exit 0, settings put back, nothing left behind, and \`load\` restores its memory`, async () => {
    const sock = snapSocket();
    const image = path.join(dir, `ch${channels}.qcow2`);
    const srcDump = path.join(dir, `src${channels}.mem`);
    const tmpBefore = privateDirs();
    // A fresh -S VM each time: a paused VM cannot migrate again (postmigrate).
    const src = await startVm(withSnapQmp({ memMiB: MEM_MIB, paused: true, loads: [{ file: pattern, addr: PAT_ADDR }], name: `multifd-src-${channels}` }, sock));
    try {
      await src.pmemsave(srcDump, MEM_MIB << 20);
      const before = await settings(src);
      const r = await runCli(['save', '--qmp', sock, '--channels', String(channels), image], { timeoutMs: 120_000 });
      assert.is(r.code, 0, r.stderr);
      assert.match(r.stderr, /saved .* over QMP/);
      assert.equal(await settings(src), before, 'capabilities and parameters as they were');
      assert.is((await src.queryStatus()).running, false, 'a paused VM stays paused');
      const mig = await src.queryMigrate();
      assert.is(mig.status, 'completed');
      if (channels > 1) assert.ok((mig.ram?.normal ?? 0) >= PAT_SIZE / 4096, 'the pattern went as data pages');
    } finally {
      await src.stop();
    }
    assert.equal(privateDirs(), tmpBefore, 'the private socket directory is removed');
    images.set(channels, image);
    const dump = path.join(dir, `dst${channels}.mem`);
    await loadAndDump(image, dump, String(channels));
    assert.is(differsOutsideBios(srcDump, dump), null, 'restored memory equals the source');
    fs.unlinkSync(dump);
    fs.unlinkSync(srcDump);
  });
}

/** The image's RAM digest table and what `info --json` says of its RAM. */
async function describe(image: string): Promise<{ digests: unknown; info: unknown }> {
  const snap = await openSnapshot(image);
  try {
    assert.ok(snap.digests, `${image} has RAM digests`);
    const { file: _file, qcow2: _qcow2, restore: _restore, ...info } = JSON.parse((await runCli(['info', '--json', image])).stdout.toString()) as Record<string, unknown>;
    return { digests: { ...snap.digests }, info };
  } finally {
    await snap.image.close();
  }
}

test('an image saved over 4 channels is the image saved over 1: same digests and description, verify ok', async () => {
  const one = await describe(images.get(1)!);
  const four = await describe(images.get(4)!);
  const d1 = one.digests as { chunks: Uint32Array; algorithm: string; chunkSize: number; stateCrc: number };
  const d4 = four.digests as typeof d1;
  const differing = [...d1.chunks.keys()].filter((i) => d1.chunks[i] !== d4.chunks[i]);
  assert.equal(differing, [], 'same RAM chunk digests');
  assert.is(d4.chunks.length, d1.chunks.length);
  assert.is(d4.algorithm, d1.algorithm);
  // stateCrc covers the device state, which holds each VM's own clocks: not compared.
  assert.equal(four.info, one.info, 'same info --json (RAM blocks, pages, devices)');
  for (const n of [2, 4]) {
    const v = await runCli(['verify', images.get(n)!]);
    assert.is(v.code, 0, v.stderr);
  }
});

test.run();
