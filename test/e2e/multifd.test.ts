// Real multifd channels from QEMU (7.2 and 10.0): a paused VM holding a
// random pattern migrates with `multifd` on to a unix socket we listen on;
// the main channel goes through MigrationFramer, the others through
// MultifdChannelParser, and the pages of both rebuild guest RAM exactly, with
// the page counts QEMU reports.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { startVm, makePattern, requireQemu } from './lib';
import { tempDir } from './common';
import type { Duplex } from 'streamx';
import { MigrationFramer } from '../../src/migration/framer';
import { MultifdChannelParser, MultifdRecord } from '../../src/migration/multifd';
import type { MigrationRecord } from '../../src/migration/records';

const MEM_MIB = 128;
const dir = tempDir('multifd');
const pattern = path.join(dir, 'pattern.bin');

test.before(() => {
  requireQemu();
  makePattern(pattern, 24 << 20, 41);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function collect<T>(stream: Duplex, bytes: Buffer): Promise<T[]> {
  const out: T[] = [];
  return new Promise((resolve, reject) => {
    stream.on('data', (r: unknown) => out.push(r as T));
    stream.on('end', () => resolve(out));
    stream.on('error', reject);
    stream.end(bytes);
  });
}

for (const channels of [2, 4]) {
  test(`${channels} channels: the main stream and the multifd packets rebuild guest RAM`, async () => {
    const sock = path.join(dir, `mig${channels}.sock`);
    const captured: Buffer[][] = [];
    const closed: Promise<void>[] = [];
    const server = net.createServer((c) => {
      const parts: Buffer[] = [];
      captured.push(parts);
      c.on('data', (b: Buffer) => parts.push(b));
      closed.push(new Promise((resolve) => c.on('close', () => resolve())));
    });
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    const dump = path.join(dir, `src${channels}.mem`);
    const vm = await startVm({ memMiB: MEM_MIB, loads: [{ file: pattern, addr: 40 << 20 }] });
    let normal: number;
    let duplicate: number;
    try {
      await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
      await vm.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels, 'max-bandwidth': 10_000_000_000 });
      await vm.qmp.execute('migrate', { uri: `unix:${sock}` });
      const info = await vm.waitForMigrationStatus('completed', 30_000);
      normal = info.ram?.normal ?? -1;
      duplicate = info.ram?.duplicate ?? -1;
      await vm.pmemsave(dump, MEM_MIB << 20);
    } finally {
      await vm.stop();
      server.close();
    }
    await Promise.all(closed);
    assert.is(captured.length, channels + 1, 'QEMU opened the main channel and one per multifd channel');
    const streams = captured.map((parts) => Buffer.concat(parts));
    // The main channel is the one that starts with QEVM; QEMU connects it first but may not be accepted first.
    const mainIndex = streams.findIndex((b) => b.readUInt32BE(0) === 0x5145564d);
    assert.ok(mainIndex >= 0, 'one channel carries the main stream');

    // Every page write, tagged with its sync epoch, applied in epoch order at
    // the end: the ordering rule src/migration/multifd.ts describes.
    const writes: Array<{ epoch: number; apply: (ram: Buffer) => void }> = [];
    const blocks = new Map<string, number>();
    let mainPages = 0;
    let mainZeros = 0;
    const main = await collect<MigrationRecord>(new MigrationFramer(), streams[mainIndex]);
    // 8.0 and later mark sync points with MULTIFD_FLUSH on new machine types, 7.2 with EOS.
    const flushMarks = main.some((r) => r.type === 'ram-multifd-flush');
    let mainEpoch = 0;
    for (const r of main) {
      if (r.type === 'ram-mem-size') for (const b of r.blocks) blocks.set(b.id, b.length);
      if (r.type === (flushMarks ? 'ram-multifd-flush' : 'ram-eos')) mainEpoch++;
      if (r.type === 'ram-page') {
        mainPages++;
        if (r.block.id === 'pc.ram') writes.push({ epoch: mainEpoch, apply: (ram) => r.data.copy(ram, r.address) });
      }
      if (r.type === 'ram-zero') {
        mainZeros++;
        if (r.block.id === 'pc.ram') writes.push({ epoch: mainEpoch, apply: (ram) => ram.fill(r.fill, r.address, r.address + 4096) });
      }
    }
    // QEMU 7.2 sometimes sends a page twice within one epoch, in two packets on
    // two channels (seen at packet boundaries); its counters count it once.
    const distinct = new Map<number, Set<string>>();
    let multifdPages = 0;
    let multifdZeros = 0;
    const ids = new Set<number>();
    for (let i = 0; i < streams.length; i++) {
      if (i === mainIndex) continue;
      const recs = await collect<MultifdRecord>(new MultifdChannelParser({ blockLength: (id) => blocks.get(id) }), streams[i]);
      let syncs = 0;
      for (const r of recs) {
        if (r.type === 'multifd-init') {
          ids.add(r.channel);
          continue;
        }
        if (r.sync) syncs++;
        let set = distinct.get(r.epoch);
        if (!set) distinct.set(r.epoch, (set = new Set()));
        for (const off of r.normal) set.add(`${r.block}:${off}`);
        multifdPages += r.normal.length;
        multifdZeros += r.zero.length;
        if (r.block !== 'pc.ram') continue;
        writes.push({
          epoch: r.epoch,
          apply: (ram) => {
            r.normal.forEach((off, k) => r.data.copy(ram, off, k * 4096, (k + 1) * 4096));
            for (const off of r.zero) ram.fill(0, off, off + 4096);
          },
        });
      }
      assert.is(syncs, mainEpoch, `channel ${i}: one SYNC packet per sync mark of the main stream (${flushMarks ? 'MULTIFD_FLUSH' : 'EOS'})`);
    }
    const ram = Buffer.alloc(MEM_MIB << 20);
    for (const w of writes.sort((a, b) => a.epoch - b.epoch)) w.apply(ram);
    assert.equal([...ids].sort(), [...Array(channels).keys()], 'each channel announced its own number');
    assert.ok(multifdPages > (24 << 20) / 4096, `the pattern's pages went over the multifd channels (${multifdPages})`);
    const distinctPages = [...distinct.values()].reduce((n, set) => n + set.size, 0);
    assert.is(mainPages + distinctPages, normal, `data pages equal query-migrate ram.normal (main ${mainPages}, multifd ${distinctPages} distinct per epoch of ${multifdPages})`);
    assert.is(mainZeros + multifdZeros, duplicate, 'zero pages equal query-migrate ram.duplicate');
    // pmemsave reads 0xA0000-0xFFFFF through the VGA/BIOS windows, not pc.ram.
    const src = fs.readFileSync(dump);
    src.fill(0, 0xa0000, 0x100000);
    ram.fill(0, 0xa0000, 0x100000);
    assert.ok(src.equals(ram), 'rebuilt RAM equals the source dump');
  });
}

test.run();
