// Issue 18: save --qmp and restore --qmp over 1, 2 and 4 channels against
// QEMU's own file migration (mapped-ram, + multifd 2, + direct-io), in one
// run, interleaved, best of N:
// - QEMU-driven saves (total-time): save --qmp --channels N with
//   --cache=writeback and --cache=none, beside the mapped-ram rows;
// - restores to completed, warm (image in the page cache) and cold (page
//   cache dropped first; root only): restore --qmp --channels N (cold: also
//   --cache=none) beside mapped-ram + multifd 2 with and without direct-io;
// - a larger VM (8 GiB holding 4 GiB; skipped with --quick): time per GiB;
// - peak RSS of every qemu-snap row (QEMU_SNAP_STATS).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { startVm, makePattern, Vm, QEMU_BINARY } from '../test/e2e/lib';
import { BenchError, Row, dropPageCache, ms, parseStats, qemuHasMappedRam, ratioRow, rmQuiet, timing, warmMemory } from './lib';

const CLI = path.resolve(__dirname, '..', 'cli', 'qemu-snap.js');
const MiB = 1 << 20;

export interface ChannelsConfig {
  memMiB: number;
  dataMiB: number;
  runs: number;
  dir: string;
  /** The pattern loaded into every source (dataMiB of random data). */
  pattern: string;
  /** Channel counts for the qemu-snap rows. */
  channels: number[];
  /** Also measure an 8 GiB VM holding 4 GiB (time per GiB). */
  big: boolean;
  log(msg: string): void;
}

interface SnapRun {
  stderr: string;
  maxRssKiB: number;
}

/** Runs the CLI with its stats line on; rejects with its stderr on failure. */
function runSnap(args: string[]): Promise<SnapRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, QEMU_SNAP_STATS: '1' } });
    let stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) return reject(new BenchError(`qemu-snap ${args.join(' ')}: exit ${code}: ${stderr.trim().split('\n').pop() ?? ''}`));
      resolve({ stderr, maxRssKiB: parseStats(stderr).maxRssKiB });
    });
  });
}

/** Reads `file` once so that a warm restore finds it in the page cache. */
function readIntoCache(file: string): void {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(4 * MiB);
  try {
    while (fs.readSync(fd, buf, 0, buf.length, null) > 0);
  } finally {
    fs.closeSync(fd);
  }
}

type Caps = Record<string, boolean>;
type Params = Record<string, unknown>;

interface SaveContender {
  name: string;
  /** qemu-snap's arguments after `save`, or QEMU's own file migration. */
  snap?: string[];
  uri?: string;
  caps?: Caps;
  params?: Params;
}

interface RestoreContender {
  name: string;
  cold: boolean;
  snap?: string[];
  caps?: Caps;
  params?: Params;
}

const MAPPED: Array<{ name: string; caps: Caps; params?: Params }> = [
  { name: 'mapped-ram', caps: { 'mapped-ram': true } },
  { name: 'mapped-ram, multifd 2', caps: { 'mapped-ram': true, multifd: true }, params: { 'multifd-channels': 2 } },
  { name: 'mapped-ram, multifd 2, direct-io', caps: { 'mapped-ram': true, multifd: true }, params: { 'multifd-channels': 2, 'direct-io': true } },
];

export class ChannelsBench {
  readonly rows: Row[] = [];
  readonly notes: string[] = [];
  private seq = 0;
  private readonly times = new Map<string, number[]>();
  private readonly rss = new Map<string, number>();

  constructor(readonly cfg: ChannelsConfig) {}

  private keep(name: string, t: number, rssKiB?: number): void {
    (this.times.get(name) ?? this.times.set(name, []).get(name) as number[]).push(t);
    if (rssKiB !== undefined) this.rss.set(name, Math.max(this.rss.get(name) ?? 0, rssKiB));
    this.cfg.log(`channels: ${name} ${ms(t)}`);
  }

  private best(name: string): number {
    return timing(this.times.get(name) ?? []).best;
  }

  private async vm(memMiB: number, pattern: string | null, incoming?: string): Promise<{ vm: Vm; sock: string }> {
    const sock = path.join(this.cfg.dir, `ch-${++this.seq}.sock`);
    const vm = await startVm({
      machine: 'pc',
      memMiB,
      paused: true,
      name: `bench-ch-${this.seq}`,
      incoming,
      // Above 3.5 GiB a pc machine's RAM is split around the PCI hole at 3 GiB: the pattern goes to 4 GiB.
      loads: pattern ? [{ file: pattern, addr: memMiB > 3584 ? 4096 * MiB : (memMiB / 4) * MiB }] : undefined,
      extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`],
    });
    return { vm, sock };
  }

  /** One QEMU-driven save; ms of QEMU's total-time. */
  private async save(c: SaveContender, memMiB: number, dataMiB: number, pattern: string, out: string): Promise<{ total: number; rssKiB?: number }> {
    rmQuiet(out);
    const { vm, sock } = await this.vm(memMiB, pattern);
    try {
      execFileSync('sync'); // no writeback of an earlier contender's output left to compete with this one
      // Memory the host took back (free page reporting, docs/benchmarks.md) costs whoever touches it next.
      warmMemory(this.cfg.dir, Math.round(dataMiB * 1.5) * MiB);
      if (c.snap) {
        const r = await runSnap(['save', '-q', '--force', ...c.snap, '--qmp', sock, out]);
        const total = (await vm.queryMigrate())['total-time'];
        if (total === undefined) throw new BenchError(`${c.name}: query-migrate gave no total-time`);
        return { total, rssKiB: r.maxRssKiB };
      }
      if (c.params) await vm.qmp.execute('migrate-set-parameters', c.params);
      const info = await vm.migrate(c.uri as string, { timeoutMs: 300_000, capabilities: c.caps });
      if (info['total-time'] === undefined) throw new BenchError(`${c.name}: query-migrate gave no total-time`);
      return { total: info['total-time'] };
    } finally {
      await vm.stop();
    }
  }

  /** One restore into a fresh -incoming defer destination; ms from migrate-incoming to completed. */
  private async restore(c: RestoreContender, memMiB: number, dataMiB: number, file: string): Promise<{ t: number; rssKiB?: number }> {
    const { vm, sock } = await this.vm(memMiB, null, 'defer');
    try {
      // No writeback of the image just saved (or of an earlier run) competes with the restore.
      execFileSync('sync');
      // The destination faults in its RAM as pages come: see save().
      warmMemory(this.cfg.dir, Math.round(dataMiB * 1.5) * MiB);
      if (c.cold) {
        if (!dropPageCache()) throw new BenchError('cannot drop the page cache');
      } else readIntoCache(file);
      if (c.snap) {
        const r = await runSnap(['restore', '--no-progress', ...c.snap, '--qmp', sock, file]);
        const done = /completed after (\d+) ms/.exec(r.stderr);
        if (!done) throw new BenchError(`${c.name}: no 'completed after' in: ${r.stderr.trim()}`);
        return { t: Number(done[1]), rssKiB: r.maxRssKiB };
      }
      if (c.caps) await vm.setMigrationCapabilities(c.caps);
      if (c.params) await vm.qmp.execute('migrate-set-parameters', c.params);
      const t0 = performance.now();
      await vm.migrateIncoming(`file:${file}`);
      await vm.waitForMigrationStatus('completed', 300_000);
      return { t: (vm.migrationStatusSeen.get('completed') as number) - t0 };
    } finally {
      await vm.stop();
    }
  }

  private saveContenders(mapped: boolean, file: string): SaveContender[] {
    const list: SaveContender[] = [];
    for (const n of this.cfg.channels) {
      list.push({ name: `save --qmp --channels ${n}`, snap: ['--channels', String(n)] });
      list.push({ name: `save --qmp --channels ${n} --cache=none`, snap: ['--channels', String(n), '--cache=none'] });
    }
    if (mapped) for (const m of MAPPED) list.push({ name: `\`file:F\` ${m.name}`, uri: `file:${file}`, caps: m.caps, params: m.params });
    return list;
  }

  private restoreContenders(mapped: boolean, cold: boolean): RestoreContender[] {
    const list: RestoreContender[] = [];
    for (const n of this.cfg.channels) list.push({ name: `restore --qmp --channels ${n}${cold ? ' (cold)' : ''}`, cold, snap: ['--channels', String(n)] });
    if (cold) for (const n of this.cfg.channels) list.push({ name: `restore --qmp --channels ${n} --cache=none (cold)`, cold, snap: ['--channels', String(n), '--cache=none'] });
    if (mapped) {
      for (const m of MAPPED.slice(1)) list.push({ name: `${m.name}${cold ? ' (cold)' : ''}`, cold, caps: m.caps, params: m.params });
    }
    return list;
  }

  async run(): Promise<void> {
    const mapped = qemuHasMappedRam(QEMU_BINARY);
    if (!mapped) this.notes.push(`channels: mapped-ram rows skipped: ${QEMU_BINARY} is older than 9.0 (run with QEMU_SNAP_QEMU=/opt/qemu-10.0/bin/qemu-system-x86_64)`);
    const cold = dropPageCache();
    if (!cold) this.notes.push('channels: cold restores skipped: cannot write /proc/sys/vm/drop_caches (not root)');
    const { memMiB, dataMiB, pattern, dir } = this.cfg;
    const image = path.join(dir, 'ch-image.qcow2');
    const mappedFile = path.join(dir, 'ch-mapped.bin');
    const out = path.join(dir, 'ch-save.out');
    const saves = this.saveContenders(mapped, out);
    for (let i = 0; i < this.cfg.runs; i++) {
      for (const c of i % 2 === 0 ? saves : [...saves].reverse()) {
        const r = await this.save(c, memMiB, dataMiB, pattern, out);
        this.keep(c.name, r.total, r.rssKiB);
        if (c.name === 'save --qmp --channels 1 --cache=none' && !fs.existsSync(image)) fs.renameSync(out, image);
        else if (c.name === '`file:F` mapped-ram, multifd 2' && !fs.existsSync(mappedFile)) fs.renameSync(out, mappedFile);
        rmQuiet(out);
      }
    }
    const restores = [...this.restoreContenders(mapped, false), ...(cold ? this.restoreContenders(mapped, true) : [])];
    for (let i = 0; i < this.cfg.runs; i++) {
      for (const c of i % 2 === 0 ? restores : [...restores].reverse()) {
        const r = await this.restore(c, memMiB, dataMiB, c.snap ? image : mappedFile);
        this.keep(c.name, r.t, r.rssKiB);
      }
    }

    const peerSave = mapped ? '`file:F` mapped-ram, multifd 2, direct-io' : null;
    for (const c of saves) {
      if (!c.snap || !peerSave) continue;
      const target = c.name === 'save --qmp --channels 2 --cache=none' ? { max: 1.0 } : undefined;
      this.rows.push(ratioRow(`QEMU save, total-time: ${c.name} (vs mapped-ram + multifd 2 + direct-io)`, this.best(c.name), ms(this.best(c.name)), this.best(peerSave), ms(this.best(peerSave)), target));
    }
    if (!peerSave) for (const c of saves) this.rows.push({ what: `QEMU save, total-time: ${c.name}`, ours: ms(this.best(c.name)), versus: '', ratio: null, target: '', met: null });
    if (mapped) {
      for (const m of MAPPED) {
        const name = `\`file:F\` ${m.name}`;
        this.rows.push({ what: `QEMU save, total-time: ${name}`, ours: ms(this.best(name)), versus: '', ratio: null, target: '', met: null });
      }
    }
    for (const c of restores) {
      if (!c.snap) continue;
      const peer = c.cold ? 'mapped-ram, multifd 2, direct-io (cold)' : 'mapped-ram, multifd 2';
      if (!mapped) {
        this.rows.push({ what: `restore to completed: ${c.name}`, ours: ms(this.best(c.name)), versus: '', ratio: null, target: '', met: null });
        continue;
      }
      const target = c.name === 'restore --qmp --channels 2' || c.name === 'restore --qmp --channels 2 --cache=none (cold)' ? { max: 1.0 } : undefined;
      this.rows.push(ratioRow(`restore to completed: ${c.name} (vs ${peer})`, this.best(c.name), ms(this.best(c.name)), this.best(peer), ms(this.best(peer)), target));
    }
    if (mapped) {
      for (const c of restores) {
        if (c.snap) continue;
        this.rows.push({ what: `restore to completed: ${c.name}`, ours: ms(this.best(c.name)), versus: '', ratio: null, target: '', met: null });
      }
    }
    if (this.cfg.big) await this.big();
    for (const [name, kib] of this.rss) {
      this.rows.push({ what: `peak RSS of ${name}`, ours: `${(kib / 1024).toFixed(0)} MiB`, versus: '', ratio: null, target: '≤ 128 MiB', met: kib <= 128 * 1024 });
    }
    rmQuiet(image);
    rmQuiet(mappedFile);
    this.notes.push(`channels: ${memMiB} MiB VM holding ${dataMiB} MiB of random data, paused sources; restores time migrate-incoming to completed (restore --qmp's own figure)`);
  }

  /** 8 GiB holding 4 GiB: save --channels 2 --cache=none and restore --channels 2 (warm), per GiB against the small VM's. */
  private async big(): Promise<void> {
    const memMiB = 8192;
    const dataMiB = 4096;
    const pattern = path.join(this.cfg.dir, 'ch-big-pattern.bin');
    const image = path.join(this.cfg.dir, 'ch-big.qcow2');
    this.cfg.log(`channels: ${dataMiB} MiB pattern for the ${memMiB} MiB VM`);
    makePattern(pattern, dataMiB * MiB, 11);
    const saveName = 'save --qmp --channels 2 --cache=none';
    const restoreName = 'restore --qmp --channels 2';
    const saveT: number[] = [];
    const restoreT: number[] = [];
    try {
      for (let i = 0; i < this.cfg.runs; i++) {
        const s = await this.save({ name: saveName, snap: ['--channels', '2', '--cache=none'] }, memMiB, dataMiB, pattern, image);
        saveT.push(s.total);
        this.rss.set(`${saveName} (8 GiB VM)`, Math.max(this.rss.get(`${saveName} (8 GiB VM)`) ?? 0, s.rssKiB ?? 0));
        const r = await this.restore({ name: restoreName, cold: false, snap: ['--channels', '2'] }, memMiB, dataMiB, image);
        restoreT.push(r.t);
        this.rss.set(`${restoreName} (8 GiB VM)`, Math.max(this.rss.get(`${restoreName} (8 GiB VM)`) ?? 0, r.rssKiB ?? 0));
        this.cfg.log(`channels 8 GiB VM run ${i + 1}: save ${ms(s.total)}, restore ${ms(r.t)}`);
      }
    } finally {
      rmQuiet(pattern);
      rmQuiet(image);
    }
    const per = (t: number, gib: number) => t / gib;
    const smallGiB = this.cfg.dataMiB / 1024;
    const bigGiB = dataMiB / 1024;
    const sBig = per(timing(saveT).best, bigGiB);
    const sSmall = per(this.best(saveName), smallGiB);
    this.rows.push(ratioRow(`time per GiB of data, ${saveName}: ${bigGiB} GiB vs ${smallGiB} GiB`, sBig, `${ms(sBig)}/GiB`, sSmall, `${ms(sSmall)}/GiB`, { max: 1.1 }));
    const rBig = per(timing(restoreT).best, bigGiB);
    const rSmall = per(this.best(restoreName), smallGiB);
    this.rows.push(ratioRow(`time per GiB of data, ${restoreName}: ${bigGiB} GiB vs ${smallGiB} GiB`, rBig, `${ms(rBig)}/GiB`, rSmall, `${ms(rSmall)}/GiB`, { max: 1.1 }));
  }
}
