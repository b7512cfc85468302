// Issue 13: RAM layouts beyond one pc.ram, saved and restored precopy and
// postcopy with guest memory identical: pc-dimm blocks above 4 GiB, NUMA
// nodes with their own memdevs, and hugepage-backed RAM (memfd hugetlb=on),
// where postcopy needs the destination's host page sizes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, makePattern, requireQemu, shellQuote, diffRanges, Vm } from './lib';
import { snapExec, tempDir } from './common';
import { openSnapshot } from '../../src/snapshot/snapshot-image';

const MEM_MIB = 512;
const GIB4 = 4 * 1024 ** 3;
const dir = tempDir('layouts');
const pattern = path.join(dir, 'pattern.bin');
const dimmPattern = path.join(dir, 'dimm-pattern.bin');
const HUGEPAGES_WANTED = 300;
let hugepagesBefore: number | null = null;
let hugeSkip: string | null = null;

/** Free 2 MiB huge pages (HugePages_Free), or -1 without hugetlb. */
function freeHugePages(): number {
  const m = /^HugePages_Free:\s+(\d+)/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) : -1;
}

test.before(() => {
  requireQemu();
  makePattern(pattern, 32 << 20, 51);
  makePattern(dimmPattern, 16 << 20, 52);
  const knob = '/proc/sys/vm/nr_hugepages';
  if (!fs.existsSync(knob) || freeHugePages() < 0) {
    hugeSkip = 'the kernel has no hugetlb support (no /proc/sys/vm/nr_hugepages)';
    return;
  }
  hugepagesBefore = Number(fs.readFileSync(knob, 'utf8'));
  if (hugepagesBefore < HUGEPAGES_WANTED) {
    try {
      fs.writeFileSync(knob, String(HUGEPAGES_WANTED));
    } catch (err) {
      hugeSkip = `cannot set vm.nr_hugepages (${(err as Error).message})`;
      return;
    }
  }
  // One 512 MiB guest at a time needs 256 of them.
  if (freeHugePages() < MEM_MIB / 2) hugeSkip = `only ${freeHugePages()} free 2 MiB huge pages after setting vm.nr_hugepages=${HUGEPAGES_WANTED}`;
});
test.after(() => {
  if (hugepagesBefore !== null && hugepagesBefore < HUGEPAGES_WANTED) {
    try {
      fs.writeFileSync('/proc/sys/vm/nr_hugepages', String(hugepagesBefore));
    } catch {
      // left as it is
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

interface Layout {
  name: string;
  args: string[];
  /** Guest-physical ranges to compare: [start, length]. */
  ranges: Array<[number, number]>;
  loads: Array<{ file: string; addr: number }>;
  /** load options for postcopy. */
  postcopyArgs?: string;
  huge?: boolean;
}

const LAYOUTS: Layout[] = [
  {
    name: 'pc-dimm above 4 GiB',
    args: ['-m', `${MEM_MIB},slots=2,maxmem=2G`, '-object', 'memory-backend-ram,id=dimm0,size=256M', '-device', 'pc-dimm,id=d0,memdev=dimm0'],
    ranges: [[0, MEM_MIB << 20], [GIB4, 256 << 20]],
    loads: [{ file: pattern, addr: 64 << 20 }, { file: dimmPattern, addr: GIB4 + (32 << 20) }],
  },
  {
    name: 'NUMA nodes with their own memdevs',
    args: ['-object', 'memory-backend-ram,id=m0,size=256M', '-object', 'memory-backend-ram,id=m1,size=256M', '-numa', 'node,nodeid=0,memdev=m0', '-numa', 'node,nodeid=1,memdev=m1'],
    ranges: [[0, MEM_MIB << 20]],
    loads: [{ file: pattern, addr: 64 << 20 }, { file: dimmPattern, addr: 300 << 20 }],
  },
  {
    name: 'hugepage-backed RAM (memfd, hugetlb=on, 2 MiB)',
    args: ['-object', `memory-backend-memfd,id=hm0,size=${MEM_MIB}M,hugetlb=on,hugetlbsize=2M`, '-machine', 'memory-backend=hm0'],
    ranges: [[0, MEM_MIB << 20]],
    loads: [{ file: pattern, addr: 64 << 20 }],
    postcopyArgs: '--host-page-size 2M',
    huge: true,
  },
];

async function dumpRanges(vm: Vm, ranges: Array<[number, number]>, tag: string): Promise<string[]> {
  const out: string[] = [];
  for (const [start, length] of ranges) {
    const f = path.join(dir, `${tag}-${start.toString(16)}.mem`);
    await vm.pmemsave(f, length, start);
    out.push(f);
  }
  return out;
}

function sameMemory(a: string[], b: string[], what: string): void {
  for (let i = 0; i < a.length; i++) {
    // kvmvapic rewrites option-ROM bytes on every incoming migration: leave 0xA0000-0xFFFFF out.
    const ranges = diffRanges(a[i], b[i], 16, 0).filter(([s, e]) => i > 0 || e <= 0xa0000 || s >= 0x100000);
    assert.equal(ranges, [], `${what}: memory identical (range ${i})`);
  }
}

for (const layout of LAYOUTS) {
  test(`${layout.name}: saved, restored precopy and postcopy with memory identical`, async () => {
    if (layout.huge && hugeSkip) {
      console.log(`  skipped: ${hugeSkip}`);
      return;
    }
    const tag = layout.name.replace(/\W+/g, '-');
    const image = path.join(dir, `${tag}.qcow2`);
    const base = { memMiB: MEM_MIB, extraArgs: layout.args };
    const src = await startVm({ ...base, loads: layout.loads, name: `${tag}-src` });
    let srcDumps: string[];
    try {
      await src.migrate(snapExec(`save -q ${shellQuote(image)}`)).catch((err: Error) => {
        throw new Error(`${err.message}; stderr: ${src.stderr.trim()}`);
      });
      srcDumps = await dumpRanges(src, layout.ranges, `${tag}-src`);
    } finally {
      await src.stop();
    }
    for (const [start, , ] of layout.loads.map((l) => [l.addr, 0, 0])) {
      assert.ok(layout.ranges.some(([s, len]) => start >= s && start < s + len), 'every pattern lies in a compared range');
    }

    const pre = await startVm({ ...base, incoming: snapExec(`load -q ${shellQuote(image)}`), name: `${tag}-pre` });
    try {
      await pre.waitForMigrationStatus('completed', 60_000).catch((err: Error) => {
        throw new Error(`${err.message}; stderr: ${pre.stderr.trim()}`);
      });
      sameMemory(srcDumps, await dumpRanges(pre, layout.ranges, `${tag}-pre`), 'precopy');
    } finally {
      await pre.stop();
    }

    const post = await startVm({ ...base, incoming: 'defer', name: `${tag}-post` });
    try {
      await post.migrateIncoming(snapExec(`load -q --postcopy 10 ${layout.postcopyArgs ?? ''} ${shellQuote(image)}`), { 'postcopy-ram': true });
      await post.waitForMigrationStatus('completed', 120_000).catch((err: Error) => {
        throw new Error(`${err.message}; stderr: ${post.stderr.trim()}`);
      });
      assert.ok(post.migrationStatusSeen.has('postcopy-active'), `postcopy ran (statuses ${[...post.migrationStatusSeen.keys()].join(', ')})`);
      sameMemory(srcDumps, await dumpRanges(post, layout.ranges, `${tag}-post`), 'postcopy');
    } finally {
      await post.stop();
    }
    if (layout.huge) {
      // Without the destination's page size, the load says what is wrong.
      const bad = await startVm({ ...base, incoming: 'defer', name: `${tag}-nohuge` });
      try {
        await bad.migrateIncoming(snapExec(`load -q --postcopy 10 ${shellQuote(image)}`), { 'postcopy-ram': true });
        await bad.waitExit(30_000);
        await new Promise((r) => setTimeout(r, 500));
        assert.match(bad.stderr, /Postcopy needs matching RAM page sizes/);
        assert.match(bad.stderr, /qemu-snap: .*page-size mismatch.*--host-page-size/);
      } finally {
        await bad.stop();
      }
    }
    for (const f of fs.readdirSync(dir)) if (f.endsWith('.mem') || f.endsWith('.qcow2')) fs.unlinkSync(path.join(dir, f));
  });
}

test('hugepages: page sizes from the stream (a postcopy-ram source), precopy and postcopy; pages requested during postcopy come in whole huge pages', async () => {
  if (hugeSkip) {
    console.log(`  skipped: ${hugeSkip}`);
    return;
  }
  const layout = LAYOUTS.find((l) => l.huge) as Layout;
  const image = path.join(dir, 'huge-pc.qcow2');
  const base = { memMiB: MEM_MIB, extraArgs: layout.args };
  const src = await startVm({ ...base, loads: layout.loads, name: 'huge-pc-src' });
  let srcDumps: string[];
  try {
    // With postcopy-ram on, MEM_SIZE carries the 2 MiB page size of the block.
    await src.migrate(snapExec(`save -q ${shellQuote(image)}`), { capabilities: { 'postcopy-ram': true } }).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${src.stderr.trim()}`);
    });
    srcDumps = await dumpRanges(src, layout.ranges, 'huge-pc-src');
  } finally {
    await src.stop();
  }
  const snap = await openSnapshot(image);
  try {
    assert.is(snap.streamBlocks.find((b) => b.length === MEM_MIB << 20)?.pageSize, 2 << 20, 'MEM_SIZE carries the huge page size');
  } finally {
    await snap.image.close();
  }
  const pre = await startVm({ ...base, incoming: snapExec(`load -q ${shellQuote(image)}`), name: 'huge-pc-pre' });
  try {
    await pre.waitForMigrationStatus('completed', 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${pre.stderr.trim()}`);
    });
    sameMemory(srcDumps, await dumpRanges(pre, layout.ranges, 'huge-pc-pre'), 'precopy of a stream with page sizes');
  } finally {
    await pre.stop();
  }
  // No --host-page-size: the stream says. --postcopy 0 and a pmemsave while
  // in postcopy: every huge page not yet received is requested.
  const post = await startVm({ ...base, incoming: 'defer', name: 'huge-pc-post' });
  try {
    await post.migrateIncoming(snapExec(`load -q --postcopy 0 ${shellQuote(image)}`), { 'postcopy-ram': true });
    await post.waitForMigrationStatus('postcopy-active', 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${post.stderr.trim()}`);
    });
    const during = await dumpRanges(post, layout.ranges, 'huge-pc-during');
    await post.waitForMigrationStatus('completed', 120_000);
    sameMemory(srcDumps, during, 'what the guest saw during postcopy');
    sameMemory(srcDumps, await dumpRanges(post, layout.ranges, 'huge-pc-post'), 'postcopy with page sizes from the stream');
  } finally {
    await post.stop();
  }
});

test.run();
