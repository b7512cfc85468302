// save --qmp against `migrate "exec:qemu-snap save"` and `exec:cat > FILE` on
// the same running VM (KVM, 2 GiB holding 1 GiB of random data; --quick:
// 512 MiB / 256 MiB), alternating, best of N. Usage:
//   node dist/bench/qmp-save.js [--quick] [--runs N] [--dir TMPDIR] [--channels 1,2,4] [--restore-only]
// The save --qmp and restore --qmp rows run once per --channels value
// (multifd for N > 1), with the peak RSS of qemu-snap when /usr/bin/time is
// there. --restore-only skips the save rows.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import minimist from 'minimist';
import { startVm, makePattern, requireQemu, shellQuote } from '../test/e2e/lib';

const CLI = path.resolve(__dirname, '..', 'cli', 'qemu-snap.js');

async function main(): Promise<void> {
  const args = minimist(process.argv.slice(2), { boolean: ['quick', 'restore-only'], string: ['runs', 'dir', 'channels'] });
  const channelCounts = String(args.channels ?? '1,2,4').split(',').map(Number);
  const timeBin = fs.existsSync('/usr/bin/time') ? '/usr/bin/time' : null;
  const rss: Record<string, number> = {};
  const runs = Number(args.runs ?? 3);
  const memMiB = args.quick ? 512 : 2048;
  const dataMiB = args.quick ? 256 : 1024;
  requireQemu();
  const dir = fs.mkdtempSync(path.join(args.dir ?? os.tmpdir(), 'qemu-snap-bench-qmp-'));
  const pattern = path.join(dir, 'pattern.bin');
  makePattern(pattern, dataMiB << 20, 3);
  const sock = path.join(dir, 'snap.sock');
  const vm = await startVm({ memMiB, paused: false, loads: [{ file: pattern, addr: 64 << 20 }], name: 'bench-qmp', extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
  const best: Record<string, { wall: number; total: number }> = {};
  const keep = (name: string, wall: number, total: number) => {
    const b = best[name];
    if (!b || wall < b.wall) best[name] = { wall, total };
    console.error(`${name}: wall ${wall.toFixed(0)} ms, QEMU total-time ${total} ms`);
  };
  try {
    for (let i = 0; i < (args['restore-only'] ? 0 : runs); i++) {
      const image = path.join(dir, 'vm.qcow2');
      let t = performance.now();
      for (const n of channelCounts) {
        const name = `save --qmp --channels ${n}`;
        const cmd = [CLI, 'save', '--force', '--channels', String(n), '--qmp', sock, image];
        t = performance.now();
        const r = timeBin ? spawnSync(timeBin, ['-f', 'qemu-snap-peak-rss-kb %M', process.execPath, ...cmd], { encoding: 'utf8' }) : spawnSync(process.execPath, cmd, { encoding: 'utf8' });
        const wall = performance.now() - t;
        if (r.status !== 0) throw new Error(`${name}: ${r.stderr}`);
        keep(name, wall, (await vm.queryMigrate())['total-time'] ?? -1);
        const kb = Number(/qemu-snap-peak-rss-kb (\d+)/.exec(r.stderr)?.[1] ?? 0);
        rss[name] = Math.max(rss[name] ?? 0, kb);
        fs.rmSync(image, { force: true });
      }

      t = performance.now();
      const m = await vm.migrate(`exec:${shellQuote(process.execPath)} ${shellQuote(CLI)} save -q ${shellQuote(image)}`);
      keep('migrate exec:qemu-snap save', performance.now() - t, m['total-time'] ?? -1);
      await vm.cont();
      fs.rmSync(image, { force: true });

      const raw = path.join(dir, 'vm.stream');
      t = performance.now();
      const c = await vm.migrate(`exec:cat > ${shellQuote(raw)}`);
      keep('migrate exec:cat > FILE', performance.now() - t, c['total-time'] ?? -1);
      await vm.cont();
      fs.rmSync(raw, { force: true });
    }
    // Restores of one image: restore --qmp (precopy, cont at completion)
    // against -incoming "exec:qemu-snap load" (QEMU started with -S, time to completed).
    const image = path.join(dir, 'vm.qcow2');
    const s = spawnSync(process.execPath, [CLI, 'save', '-q', '--force', '--qmp', sock, image], { encoding: 'utf8' });
    if (s.status !== 0) throw new Error(`save --qmp: ${s.stderr}`);
    for (let i = 0; i < runs; i++) {
      for (const n of channelCounts) {
        const name = n > 1 ? `restore --qmp --channels ${n}` : 'restore --qmp';
        const dsock = path.join(dir, `dst-${i}-${n}.sock`);
        const dst = await startVm({ memMiB, paused: true, incoming: 'defer', name: 'bench-qmp-dst', extraArgs: ['-qmp', `unix:${dsock},server=on,wait=off`] });
        try {
          const cmd = [CLI, 'restore', '--channels', String(n), '--qmp', dsock, image];
          const t = performance.now();
          const r = timeBin ? spawnSync(timeBin, ['-f', 'qemu-snap-peak-rss-kb %M', process.execPath, ...cmd], { encoding: 'utf8' }) : spawnSync(process.execPath, cmd, { encoding: 'utf8' });
          if (r.status !== 0) throw new Error(`${name}: ${r.stderr}`);
          keep(name, performance.now() - t, Number(/completed after (\d+) ms/.exec(r.stderr)?.[1] ?? -1));
          const kb = Number(/qemu-snap-peak-rss-kb (\d+)/.exec(r.stderr)?.[1] ?? 0);
          rss[name] = Math.max(rss[name] ?? 0, kb);
        } finally {
          await dst.stop();
        }
      }
      const t = performance.now();
      const ex = await startVm({ memMiB, paused: true, incoming: `exec:${shellQuote(process.execPath)} ${shellQuote(CLI)} load -q ${shellQuote(image)}`, name: 'bench-exec-dst' });
      try {
        await ex.waitForMigrationStatus('completed', 120_000);
        keep('-incoming exec:qemu-snap load', performance.now() - t, -1);
      } finally {
        await ex.stop();
      }
    }
  } finally {
    await vm.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`running KVM VM, ${memMiB} MiB with ${dataMiB} MiB of random data, best of ${runs} (wall: command start to exit, or to completed; the exec: save rows have max-bandwidth raised by the harness; the exec: load row includes QEMU's start-up; the restore --qmp rows give ms to completed in the total-time column):`);
  for (const [name, b] of Object.entries(best)) {
    const peak = rss[name] ? `  peak RSS ${(rss[name] / 1024).toFixed(0)} MiB` : '';
    console.log(`  ${name.padEnd(30)} wall ${b.wall.toFixed(0)} ms  QEMU total-time ${b.total} ms${peak}`);
  }
}

main().catch((err: Error) => {
  console.error(`bench qmp-save: ${err.message}`);
  process.exit(1);
});
