// The benchmark behind `npm run bench`: qemu-snap against cat and against
// QEMU's own savevm/loadvm, with real QEMU, side by side in one run, and the
// targets from the issues checked. Usage:
//   node dist/bench/run.js [--quick] [--runs N] [--dir TMPDIR] [--json FILE]
// Full: a 2 GiB VM holding 1 GiB of random data; --quick: 512 MiB with 256 MiB.
// Every figure is the best of N runs (3 by default); timings on shared
// machines vary a lot, so only ratios within one run mean anything.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import minimist from 'minimist';
import { Writable } from 'streamx';
import { MigrationFramer } from '../src/migration/framer';
import { ChannelsBench } from './channels';
import { startVm, makePattern, createQcow2, savevmTiming, loadvmTiming, defaultAccel, requireQemu, Vm, VmOptions, MigrationInfo, QEMU_BINARY } from '../test/e2e/lib';
import {
  BenchError,
  Row,
  Timing,
  allocatedBytes,
  dropPageCache,
  qemuHasMappedRam,
  bestOf,
  formatMachine,
  formatTable,
  freeBytes,
  machineInfo,
  mib,
  ms,
  percentile,
  q,
  ratioRow,
  rmQuiet,
  statsFromFile,
  timeShell,
  timing,
  CliStats,
  warmMemory,
} from './lib';

const CLI = path.resolve(__dirname, '..', 'cli', 'qemu-snap.js');
const NODE = process.execPath;
const MiB = 1 << 20;

interface Config {
  memMiB: number;
  dataMiB: number;
  runs: number;
  dir: string;
}

function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

/** qemu-snap as a shell command; its stats line goes to `statsFile`. */
function snapCmd(args: string, statsFile: string): string {
  return `QEMU_SNAP_STATS=1 exec ${q(NODE)} ${q(CLI)} ${args} 2>${q(statsFile)}`;
}

class Bench {
  readonly pattern: string;
  readonly stream: string;
  readonly image: string;
  readonly savevmDisk: string;
  readonly rows: Row[] = [];
  readonly notes: string[] = [];
  private readonly statsFile: string;
  private vmSeq = 0;

  constructor(readonly cfg: Config) {
    this.pattern = path.join(cfg.dir, 'pattern.bin');
    this.stream = path.join(cfg.dir, 'vm.stream');
    this.image = path.join(cfg.dir, 'vm.qcow2');
    this.savevmDisk = path.join(cfg.dir, 'savevm.qcow2');
    this.statsFile = path.join(cfg.dir, 'stats.txt');
  }

  private vmOpts(extra: Partial<VmOptions> = {}): VmOptions {
    return { machine: 'pc', memMiB: this.cfg.memMiB, paused: true, name: `bench-${++this.vmSeq}`, ...extra };
  }

  /** A fresh paused source holding the pattern: a source in postmigrate cannot migrate again. */
  private source(withDisk = false, more: string[] = []): Promise<Vm> {
    const extraArgs = [...(withDisk ? ['-drive', `if=none,id=d0,file=${this.savevmDisk},format=qcow2`] : []), ...more];
    return startVm(this.vmOpts({ loads: [{ file: this.pattern, addr: (this.cfg.memMiB / 4) * MiB }], extraArgs }));
  }

  /** Before every timed run: see warmMemory. */
  private warm(): void {
    warmMemory(this.cfg.dir, Math.round(this.cfg.dataMiB * 1.5) * MiB);
  }

  private stats(): CliStats {
    return statsFromFile(this.statsFile);
  }

  async prepare(): Promise<void> {
    log(`pattern: ${this.cfg.dataMiB} MiB of random data in a ${this.cfg.memMiB} MiB VM`);
    makePattern(this.pattern, this.cfg.dataMiB * MiB, 6);
    const src = await this.source();
    try {
      const info = await src.migrate(`exec:cat > ${q(this.stream)}`, { timeoutMs: 120_000 });
      const size = fs.statSync(this.stream).size;
      this.notes.push(`stream: ${size} bytes (${mib(size)}); QEMU sent ${info.ram?.normal} data pages and ${info.ram?.duplicate} zero pages`);
      log(`captured ${mib(size)} stream`);
    } finally {
      await src.stop();
    }
  }

  /** 1 and 6: `cat STREAM | qemu-snap save IMG` vs `cat STREAM | cat > FILE`; peak RSS; image size. */
  async savePipe(): Promise<void> {
    const file = path.join(this.cfg.dir, 'cat.out');
    const cat: number[] = [];
    const catSync: number[] = [];
    const save: number[] = [];
    const rss: number[] = [];
    for (let i = 0; i < this.cfg.runs; i++) {
      rmQuiet(this.image);
      execFileSync('sync'); // each run starts without the previous run's dirty pages
      this.warm();
      const s = await timeShell(`cat ${q(this.stream)} | ${snapCmd(`save -q ${q(this.image)}`, this.statsFile)}`);
      save.push(s.ms);
      rss.push(this.stats().maxRssKiB);
      execFileSync('sync');
      this.warm();
      cat.push((await timeShell(`cat ${q(this.stream)} | cat > ${q(file)}`)).ms);
      rmQuiet(file);
      execFileSync('sync');
      this.warm();
      // save fsyncs its image before publishing it; this is cat doing the same.
      catSync.push((await timeShell(`cat ${q(this.stream)} | cat > ${q(file)} && sync ${q(file)}`)).ms);
      rmQuiet(file);
      log(`save pipe run ${i + 1}: qemu-snap ${ms(save[i])}, cat ${ms(cat[i])}, cat+sync ${ms(catSync[i])}`);
    }
    const t = timing(save);
    const c = timing(cat);
    const cs = timing(catSync);
    this.rows.push(ratioRow('save through a pipe (vs `cat > FILE`)', t.best, ms(t.best), c.best, ms(c.best), { max: 1.25 }));
    this.rows.push(ratioRow('save through a pipe (vs `cat > FILE && sync FILE`)', t.best, ms(t.best), cs.best, ms(cs.best)));
    this.saveRss = Math.max(...rss);
    const streamSize = fs.statSync(this.stream).size;
    const imgSize = fs.statSync(this.image).size;
    const imgAlloc = allocatedBytes(this.image);
    this.rows.push({
      what: 'image size vs stream size',
      ours: `${mib(imgSize)} (${mib(imgAlloc)} allocated)`,
      versus: mib(streamSize),
      ratio: imgAlloc / streamSize,
      target: '',
      met: null,
    });
  }

  private saveRss = 0;
  private loadRss = 0;

  /** 3: `qemu-snap load IMG | cat > /dev/null` vs `cat STREAM | cat > /dev/null`. */
  async loadPipe(): Promise<void> {
    const cat: number[] = [];
    const load: number[] = [];
    const rss: number[] = [];
    for (let i = 0; i < this.cfg.runs; i++) {
      this.warm();
      load.push((await timeShell(`${snapCmd(`load ${q(this.image)}`, this.statsFile)} | cat > /dev/null`)).ms);
      rss.push(this.stats().maxRssKiB);
      this.warm();
      cat.push((await timeShell(`cat ${q(this.stream)} | cat > /dev/null`)).ms);
      log(`load pipe run ${i + 1}: qemu-snap ${ms(load[i])}, cat ${ms(cat[i])}`);
    }
    const t = timing(load);
    const c = timing(cat);
    this.rows.push(ratioRow('load through a pipe (vs `cat STREAM | cat`)', t.best, ms(t.best), c.best, ms(c.best), { max: 1.0 }));
    this.loadRss = Math.max(...rss);
  }

  /** framer ≥ 0.8× cat pipe: the parser alone, in this process, on the captured stream. */
  async framer(): Promise<void> {
    const cat = await bestOf(this.cfg.runs, async () => (await timeShell(`cat ${q(this.stream)} | cat > /dev/null`)).ms);
    const fr = await bestOf(this.cfg.runs, () => timeFramer(this.stream));
    const size = fs.statSync(this.stream).size;
    const mbs = (t: number) => `${Math.round(size / 1e3 / t)} MB/s`;
    // Throughput ratio: higher is better.
    this.rows.push(ratioRow('framer throughput (vs `cat STREAM | cat`)', cat.best, mbs(fr.best), fr.best, mbs(cat.best), { min: 0.8 }));
  }

  /** 2: QEMU's migration into exec:qemu-snap save vs exec:cat, and savevm. */
  async qemuSave(): Promise<void> {
    const file = path.join(this.cfg.dir, 'exec-cat.out');
    const img = path.join(this.cfg.dir, 'exec-save.qcow2');
    const res = { cat: [] as number[], catWall: [] as number[], snap: [] as number[], snapWall: [] as number[], savevm: [] as number[], rss: [] as number[] };
    for (let i = 0; i < this.cfg.runs; i++) {
      const one = async (uri: string): Promise<[number, number]> => {
        const src = await this.source();
        try {
          // Neither side inherits the other's dirty pages (1 GiB of them slows
          // whatever writes next, and our fdatasyncs wait on the writeback).
          execFileSync('sync');
          this.warm();
          const t0 = performance.now();
          const info = await src.migrate(uri, { timeoutMs: 120_000 });
          const wall = performance.now() - t0;
          if (info['total-time'] === undefined) throw new BenchError(`query-migrate gave no total-time for ${uri}`);
          return [info['total-time'], wall];
        } finally {
          await src.stop();
        }
      };
      let ct = 0;
      let cw = 0;
      let st = 0;
      let sw = 0;
      const catRun = async (): Promise<void> => {
        [ct, cw] = await one(`exec:cat > ${q(file)}`);
        rmQuiet(file);
      };
      const snapRun = async (): Promise<void> => {
        rmQuiet(img);
        [st, sw] = await one(`exec:${snapCmd(`save -q ${q(img)}`, this.statsFile)}`);
        const cli = this.stats();
        res.rss.push(cli.maxRssKiB);
        log(`  exec:qemu-snap save ran ${cli.ms} ms from start to exit`);
        rmQuiet(img);
      };
      // Alternating which goes first, as for the restores.
      for (const f of i % 2 === 0 ? [catRun, snapRun] : [snapRun, catRun]) await f();
      rmQuiet(this.savevmDisk);
      createQcow2(this.savevmDisk, `${this.cfg.memMiB}M`);
      const src = await this.source(true);
      try {
        this.warm();
        res.savevm.push(await savevmTiming(src, 'bench'));
      } finally {
        await src.stop();
      }
      res.cat.push(ct);
      res.catWall.push(cw);
      res.snap.push(st);
      res.snapWall.push(sw);
      log(`QEMU save run ${i + 1}: exec:qemu-snap ${st} ms (wall ${ms(sw)}), exec:cat ${ct} ms (wall ${ms(cw)}), savevm ${ms(res.savevm[i])}`);
    }
    const snap = timing(res.snap);
    const cat = timing(res.cat);
    const snapWall = timing(res.snapWall);
    const catWall = timing(res.catWall);
    const savevm = timing(res.savevm);
    this.rows.push(ratioRow('QEMU save, total-time (vs `exec:cat > FILE`)', snap.best, ms(snap.best), cat.best, ms(cat.best), { max: 1.1 }));
    this.rows.push(ratioRow('QEMU save, wall (vs `exec:cat > FILE`)', snapWall.best, ms(snapWall.best), catWall.best, ms(catWall.best), { max: 1.1 }));
    this.rows.push(ratioRow('QEMU save, wall (faster than savevm)', snapWall.best, ms(snapWall.best), savevm.best, `savevm ${ms(savevm.best)}`, { below: 1 }));
    this.saveRss = Math.max(this.saveRss, ...res.rss);
  }

  /** 4: restore time, migrate-incoming → completed, for exec:qemu-snap load vs exec:cat; loadvm. */
  async qemuRestore(): Promise<void> {
    const res = { cat: [] as number[], snap: [] as number[], loadvm: [] as number[] };
    if (!fs.existsSync(this.savevmDisk)) {
      // `--only qemu-restore`: loadvm needs the snapshot QEMU save's savevm runs leave.
      createQcow2(this.savevmDisk, `${this.cfg.memMiB}M`);
      const src = await this.source(true);
      try {
        await savevmTiming(src, 'bench');
      } finally {
        await src.stop();
      }
    }
    for (let i = 0; i < this.cfg.runs; i++) {
      // Which goes first alternates: a restore that follows another VM's exit
      // on this machine can be slower, whichever tool feeds it.
      const snapRun = async (): Promise<void> => {
        res.snap.push(await this.incoming(`exec:${snapCmd(`load ${q(this.image)}`, this.statsFile)}`));
        this.loadRss = Math.max(this.loadRss, this.stats().maxRssKiB);
      };
      const catRun = async (): Promise<void> => void res.cat.push(await this.incoming(`exec:cat ${q(this.stream)}`));
      for (const f of i % 2 === 0 ? [snapRun, catRun] : [catRun, snapRun]) await f();
      const dst = await startVm(this.vmOpts({ extraArgs: ['-drive', `if=none,id=d0,file=${this.savevmDisk},format=qcow2`] }));
      try {
        this.warm();
        res.loadvm.push(await loadvmTiming(dst, 'bench'));
      } finally {
        await dst.stop();
      }
      log(`QEMU restore run ${i + 1}: exec:qemu-snap load ${ms(res.snap[i])}, exec:cat ${ms(res.cat[i])}, loadvm ${ms(res.loadvm[i])}`);
    }
    const snap = timing(res.snap);
    const cat = timing(res.cat);
    const loadvm = timing(res.loadvm);
    this.precopyRestore = snap;
    this.rows.push(ratioRow('QEMU restore (vs `-incoming exec:cat STREAM`)', snap.best, ms(snap.best), cat.best, ms(cat.best), { max: 1.0 }));
    this.rows.push(ratioRow('QEMU restore (faster than loadvm)', snap.best, ms(snap.best), loadvm.best, `loadvm ${ms(loadvm.best)}`, { below: 1 }));
  }

  private precopyRestore: Timing | null = null;

  /**
   * One destination (-S, -incoming defer): ms from migrate-incoming to
   * `completed` (or to `until`); QEMU start-up is not counted.
   */
  private async incoming(uri: string, caps?: Record<string, boolean>, during?: (dst: Vm) => Promise<void>): Promise<number> {
    const dst = await startVm(this.vmOpts({ incoming: 'defer' }));
    try {
      if (caps) await dst.setMigrationCapabilities(caps);
      this.warm();
      const t0 = performance.now();
      await dst.migrateIncoming(uri);
      if (during) await during(dst);
      await dst.waitForMigrationStatus('completed', 180_000);
      this.lastSeen = new Map([...dst.migrationStatusSeen].map(([k, v]) => [k, v - t0]));
      return (dst.migrationStatusSeen.get('completed') as number) - t0;
    } finally {
      await dst.stop();
    }
  }

  private lastSeen = new Map<string, number>();

  /** 5: postcopy time to running (postcopy-active) and to completed; request latency. */
  async postcopy(): Promise<void> {
    const precopy = this.precopyRestore;
    if (!precopy) throw new BenchError('postcopy needs the precopy restore figures first');
    for (const pct of [0, 10]) {
      const running: number[] = [];
      const completed: number[] = [];
      for (let i = 0; i < this.cfg.runs; i++) {
        completed.push(await this.incoming(`exec:${snapCmd(`load -q --postcopy ${pct} ${q(this.image)}`, this.statsFile)}`, { 'postcopy-ram': true }));
        const active = this.lastSeen.get('postcopy-active');
        if (active === undefined) throw new BenchError(`--postcopy ${pct}: the destination never showed postcopy-active (saw ${[...this.lastSeen.keys()].join(', ')})`);
        running.push(active);
        this.loadRss = Math.max(this.loadRss, this.stats().maxRssKiB);
        log(`postcopy ${pct}% run ${i + 1}: running after ${ms(active)}, completed after ${ms(completed[i])}`);
      }
      const r = timing(running);
      const c = timing(completed);
      this.rows.push(ratioRow(`postcopy ${pct}%: time to running (vs precopy restore)`, r.best, ms(r.best), precopy.best, ms(precopy.best), { below: 0.3 }));
      this.rows.push(ratioRow(`postcopy ${pct}%: time to completed (vs precopy restore)`, c.best, ms(c.best), precopy.best, ms(precopy.best)));
    }
    // Page requests: QEMU faults on every page not yet received while pmemsave reads all of RAM.
    // A load that dies meanwhile leaves QEMU blocked in the fault for good: time out, say why, go on.
    const dump = path.join(this.cfg.dir, 'postcopy.mem');
    const what = 'postcopy 0% page-request latency p50 / p99 (pmemsave of all RAM during postcopy)';
    try {
      await this.incoming(`exec:${snapCmd(`load -q --postcopy 0 ${q(this.image)}`, this.statsFile)}`, { 'postcopy-ram': true }, async (dst) => {
        await dst.waitForMigrationStatus('postcopy-active', 60_000);
        await withTimeout(dst.pmemsave(dump, this.cfg.memMiB * MiB), 60_000, 'pmemsave during postcopy');
      });
      const req = this.stats().requests;
      if (!req || req.count === 0) throw new BenchError('no page requests were served');
      const lat = req.latenciesMs;
      this.rows.push({ what: `${what}, ${req.count} requests`, ours: `${percentile(lat, 50).toFixed(2)} / ${percentile(lat, 99).toFixed(2)} ms`, versus: '', ratio: null, target: '', met: null });
    } catch (err) {
      const loadErr = fs.existsSync(this.statsFile) ? fs.readFileSync(this.statsFile, 'utf8').split('\n').find((l) => /Error|qemu-snap:/.test(l)) : undefined;
      const why = `${(err as Error).message}${loadErr ? `; load: ${loadErr.trim()}` : ''}`;
      log(`postcopy latency run failed: ${why}`);
      this.rows.push({ what, ours: 'failed', versus: '', ratio: null, target: 'works', met: false });
      this.notes.push(`postcopy latency run failed: ${why}`);
    } finally {
      rmQuiet(dump);
    }
  }

  /** Bytes of `file` in the page cache (util-linux fincore), or -1 when it cannot say. */
  private cached(file: string): number {
    try {
      const out = execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' });
      return Number(out.trim());
    } catch {
      return -1;
    }
  }

  /**
   * Issue 14: cache modes side by side. QEMU-driven saves (total-time):
   * exec:cat > F, the same && sync F, save, --cache=none (--aio=threads,
   * native and io_uring), --cache=unsafe, `save --qmp --cache=none` (no
   * pipe, no process start inside total-time), the `exec:` pipe alone,
   * with QEMU's own mapped-ram file migration when this QEMU has it (≥ 9.0);
   * pipe saves beside their like-for-like cat; cold restores; the image's
   * bytes left in the page cache and the peak RSS of each mode.
   */
  async cacheModes(): Promise<void> {
    const file = path.join(this.cfg.dir, 'cache-cat.out');
    const img = path.join(this.cfg.dir, 'cache-save.qcow2');
    const mappedRam = qemuHasMappedRam(QEMU_BINARY);
    // `qmp`: qemu-snap drives the source itself over QMP (`save --qmp`) and
    // QEMU sends into a socket we hand it: no `exec:` pipe and no process
    // start inside total-time.
    type Contender = { name: string; uri: string; out?: string; caps?: Record<string, boolean>; params?: Record<string, unknown>; qmp?: string };
    const qmpSocket = path.join(this.cfg.dir, 'cache-qmp.sock');
    const PIPE_ALONE = '`exec:` pipe alone (1 MiB pipe, discarded)';
    const contenders: Contender[] = [
      { name: '`exec:cat > F`', uri: `exec:cat > ${q(file)}`, out: file },
      { name: '`exec:cat > F && sync F`', uri: `exec:cat > ${q(file)} && sync ${q(file)}`, out: file },
      { name: 'save (writeback)', uri: `exec:${snapCmd(`save -q ${q(img)}`, this.statsFile)}`, out: img },
      { name: 'save --cache=none', uri: `exec:${snapCmd(`save -q --cache=none ${q(img)}`, this.statsFile)}`, out: img },
      { name: 'save --cache=unsafe', uri: `exec:${snapCmd(`save -q --cache=unsafe ${q(img)}`, this.statsFile)}`, out: img },
      { name: 'save --cache=none --aio=native', uri: `exec:${snapCmd(`save -q --cache=none --aio=native ${q(img)}`, this.statsFile)}`, out: img },
      { name: 'save --cache=none --aio=io_uring', uri: `exec:${snapCmd(`save -q --cache=none --aio=io_uring ${q(img)}`, this.statsFile)}`, out: img },
      { name: 'save --qmp --cache=none', uri: '', out: img, qmp: snapCmd(`save -q --qmp ${q(qmpSocket)} --cache=none ${q(img)}`, this.statsFile) },
      // What the `exec:` transport costs by itself: a reader that grows the
      // pipe to 1 MiB (as save does) and discards what it reads.
      { name: PIPE_ALONE, uri: `exec:perl -e 'fcntl(STDIN, 1031, 1048576); 1 while sysread(STDIN, $b, 1048576)'` },
    ];
    if (mappedRam) {
      contenders.push(
        { name: '`file:F` mapped-ram', uri: `file:${file}`, out: file, caps: { 'mapped-ram': true } },
        { name: '`file:F` mapped-ram, multifd 2', uri: `file:${file}`, out: file, caps: { 'mapped-ram': true, multifd: true }, params: { 'multifd-channels': 2 } },
        { name: '`file:F` mapped-ram, multifd 2, direct-io', uri: `file:${file}`, out: file, caps: { 'mapped-ram': true, multifd: true }, params: { 'multifd-channels': 2, 'direct-io': true } },
      );
    } else this.notes.push(`mapped-ram rows skipped: ${QEMU_BINARY} is older than 9.0 (run with QEMU_SNAP_QEMU=/opt/qemu-10.0/bin/qemu-system-x86_64)`);
    const times = new Map<string, number[]>();
    const cachedBytes = new Map<string, number>();
    const rss = new Map<string, number>();
    const saved = path.join(this.cfg.dir, 'cache-none.qcow2');
    const mappedFile = path.join(this.cfg.dir, 'mapped-ram.bin');
    for (let i = 0; i < this.cfg.runs; i++) {
      const order = i % 2 === 0 ? contenders : [...contenders].reverse();
      for (const c of order) {
        if (c.out !== undefined) rmQuiet(c.out);
        rmQuiet(qmpSocket);
        const src = await this.source(false, c.qmp === undefined ? [] : ['-qmp', `unix:${qmpSocket},server=on,wait=off`]);
        let total: number;
        try {
          execFileSync('sync');
          this.warm();
          if (c.params) await src.qmp.execute('migrate-set-parameters', c.params);
          let info: MigrationInfo;
          if (c.qmp !== undefined) {
            await timeShell(c.qmp).catch((err: Error) => {
              throw new BenchError(`${c.name}: ${err.message} ${fs.readFileSync(this.statsFile, 'utf8').trim().split('\n').slice(-2).join(' | ')}`);
            });
            info = await src.queryMigrate();
            if (info.status !== 'completed') throw new BenchError(`${c.name}: the source's migration is ${info.status}, not completed`);
          } else {
            info = await src.migrate(c.uri, { timeoutMs: 180_000, capabilities: c.caps });
          }
          if (info['total-time'] === undefined) throw new BenchError(`query-migrate gave no total-time for ${c.name}`);
          total = info['total-time'];
        } finally {
          await src.stop();
        }
        (times.get(c.name) ?? times.set(c.name, []).get(c.name) as number[]).push(total);
        if (c.out !== undefined) cachedBytes.set(c.name, Math.max(cachedBytes.get(c.name) ?? 0, this.cached(c.out)));
        if (c.out === img) rss.set(c.name, Math.max(rss.get(c.name) ?? 0, this.stats().maxRssKiB));
        if (c.name === 'save --cache=none') fs.renameSync(img, saved);
        else if (c.name === '`file:F` mapped-ram, multifd 2' && mappedRam) fs.renameSync(file, mappedFile);
        else if (c.out !== undefined) rmQuiet(c.out);
        log(`cache modes run ${i + 1}: ${c.name} ${total} ms, ${mib(Math.max(0, cachedBytes.get(c.name) ?? 0))} cached`);
      }
    }
    const best = (name: string) => timing(times.get(name) as number[]).best;
    const cat = best('`exec:cat > F`');
    const catSync = best('`exec:cat > F && sync F`');
    for (const c of contenders) {
      const b = best(c.name);
      const versus = c.name === 'save --cache=unsafe' || c.name === PIPE_ALONE || c.name.startsWith('`file') ? ['`exec:cat > F`', cat] : ['`exec:cat > F && sync F`', catSync];
      this.rows.push(ratioRow(`QEMU save, total-time: ${c.name} (vs ${versus[0]})`, b, ms(b), versus[1] as number, ms(versus[1] as number)));
    }
    if (mappedRam) {
      const peer = best('`file:F` mapped-ram, multifd 2, direct-io');
      const none = best('save --cache=none');
      this.rows.push(ratioRow('QEMU save, total-time: save --cache=none (vs mapped-ram + multifd 2 + direct-io)', none, ms(none), peer, ms(peer), { max: 1.2 }));
      const aio = best('save --cache=none --aio=native');
      this.rows.push(ratioRow('QEMU save, total-time: save --cache=none --aio=native (vs mapped-ram + multifd 2 + direct-io)', aio, ms(aio), peer, ms(peer), { max: 1.2 }));
      const viaQmp = best('save --qmp --cache=none');
      this.rows.push(ratioRow('QEMU save, total-time: save --qmp --cache=none (vs mapped-ram + multifd 2 + direct-io)', viaQmp, ms(viaQmp), peer, ms(peer), { max: 1.2 }));
      const pipeAlone = best(PIPE_ALONE);
      this.rows.push(ratioRow('QEMU save, total-time: `exec:` pipe alone, nothing written (vs mapped-ram + multifd 2 + direct-io)', pipeAlone, ms(pipeAlone), peer, ms(peer)));
    }
    const aioSave = best('save --cache=none --aio=native');
    const threadsSave = best('save --cache=none');
    this.rows.push(ratioRow('QEMU save, total-time: --cache=none --aio=native (vs --aio=threads)', aioSave, ms(aioSave), threadsSave, ms(threadsSave)));
    const uringSave = best('save --cache=none --aio=io_uring');
    this.rows.push(ratioRow('QEMU save, total-time: --cache=none --aio=io_uring (vs --aio=threads)', uringSave, ms(uringSave), threadsSave, ms(threadsSave)));
    const dataGiB = this.cfg.dataMiB / 1024;
    for (const c of contenders) {
      if (c.out === undefined) continue;
      const bytes = cachedBytes.get(c.name) ?? -1;
      const limit = c.name.includes('--cache=none') ? { target: '≤ 16 MiB per GiB saved', met: bytes >= 0 && bytes <= 16 * MiB * dataGiB } : { target: '', met: null };
      this.rows.push({ what: `page cache left by ${c.name}`, ours: bytes < 0 ? 'n/a (no fincore)' : mib(bytes), versus: '', ratio: null, ...limit });
    }
    for (const [name, kib] of rss) {
      this.rows.push({ what: `peak RSS of ${name}`, ours: `${(kib / 1024).toFixed(0)} MiB`, versus: '', ratio: null, target: '≤ 128 MiB', met: kib <= 128 * 1024 });
    }

    // Pipe saves, each beside its like-for-like cat.
    const pipe = new Map<string, number[]>();
    const push = (k: string, v: number) => (pipe.get(k) ?? pipe.set(k, []).get(k) as number[]).push(v);
    for (let i = 0; i < this.cfg.runs; i++) {
      for (const [k, cmd, out] of [
        ['cat > F', `cat ${q(this.stream)} | cat > ${q(file)}`, file],
        ['cat > F && sync F', `cat ${q(this.stream)} | cat > ${q(file)} && sync ${q(file)}`, file],
        ['save', `cat ${q(this.stream)} | ${snapCmd(`save -q ${q(img)}`, this.statsFile)}`, img],
        ['save --cache=none', `cat ${q(this.stream)} | ${snapCmd(`save -q --cache=none ${q(img)}`, this.statsFile)}`, img],
        ['save --cache=unsafe', `cat ${q(this.stream)} | ${snapCmd(`save -q --cache=unsafe ${q(img)}`, this.statsFile)}`, img],
        ['save --cache=none --aio=native', `cat ${q(this.stream)} | ${snapCmd(`save -q --cache=none --aio=native ${q(img)}`, this.statsFile)}`, img],
        ['save --cache=none --aio=io_uring', `cat ${q(this.stream)} | ${snapCmd(`save -q --cache=none --aio=io_uring ${q(img)}`, this.statsFile)}`, img],
      ] as const) {
        rmQuiet(out);
        execFileSync('sync');
        this.warm();
        push(k, (await timeShell(cmd)).ms);
        if (out === img) rss.set(`pipe ${k}`, Math.max(rss.get(`pipe ${k}`) ?? 0, this.stats().maxRssKiB));
        rmQuiet(out);
      }
    }
    const pb = (k: string) => timing(pipe.get(k) as number[]).best;
    this.rows.push(ratioRow('pipe: save (vs `cat > F && sync F`)', pb('save'), ms(pb('save')), pb('cat > F && sync F'), ms(pb('cat > F && sync F')), { max: 1.0 }));
    this.rows.push(ratioRow('pipe: save --cache=none (vs `cat > F && sync F`)', pb('save --cache=none'), ms(pb('save --cache=none')), pb('cat > F && sync F'), ms(pb('cat > F && sync F'))));
    this.rows.push(ratioRow('pipe: save --cache=unsafe (vs `cat > F`)', pb('save --cache=unsafe'), ms(pb('save --cache=unsafe')), pb('cat > F'), ms(pb('cat > F')), { max: 1.1 }));
    this.rows.push(ratioRow('pipe: save --cache=none --aio=native (vs --aio=threads)', pb('save --cache=none --aio=native'), ms(pb('save --cache=none --aio=native')), pb('save --cache=none'), ms(pb('save --cache=none'))));
    this.rows.push(ratioRow('pipe: save --cache=none --aio=io_uring (vs --aio=threads)', pb('save --cache=none --aio=io_uring'), ms(pb('save --cache=none --aio=io_uring')), pb('save --cache=none'), ms(pb('save --cache=none'))));

    // Cold restores: page cache dropped before each.
    if (!dropPageCache()) {
      this.notes.push('cold restores skipped: cannot write /proc/sys/vm/drop_caches (not root)');
      return;
    }
    const cold = new Map<string, number[]>();
    const coldRuns: Array<[string, string, Record<string, boolean>?, Record<string, unknown>?]> = [
      ['`-incoming exec:cat STREAM`', `exec:cat ${q(this.stream)}`],
      ['load', `exec:${snapCmd(`load ${q(saved)}`, this.statsFile)}`],
      ['load --cache=none', `exec:${snapCmd(`load --cache=none ${q(saved)}`, this.statsFile)}`],
      ['load --cache=none --aio=native', `exec:${snapCmd(`load --cache=none --aio=native ${q(saved)}`, this.statsFile)}`],
      ['load --cache=none --aio=io_uring', `exec:${snapCmd(`load --cache=none --aio=io_uring ${q(saved)}`, this.statsFile)}`],
    ];
    if (mappedRam) {
      coldRuns.push(['mapped-ram, multifd 2', `file:${mappedFile}`, { 'mapped-ram': true, multifd: true }, { 'multifd-channels': 2 }]);
      coldRuns.push(['mapped-ram, multifd 2, direct-io', `file:${mappedFile}`, { 'mapped-ram': true, multifd: true }, { 'multifd-channels': 2, 'direct-io': true }]);
    }
    for (let i = 0; i < this.cfg.runs; i++) {
      for (const [k, uri, caps, params] of i % 2 === 0 ? coldRuns : [...coldRuns].reverse()) {
        const dst = await startVm(this.vmOpts({ incoming: 'defer' }));
        try {
          if (caps) await dst.setMigrationCapabilities(caps);
          if (params) await dst.qmp.execute('migrate-set-parameters', params);
          this.warm();
          dropPageCache();
          const t0 = performance.now();
          await dst.migrateIncoming(uri);
          await dst.waitForMigrationStatus('completed', 180_000);
          const t = (dst.migrationStatusSeen.get('completed') as number) - t0;
          (cold.get(k) ?? cold.set(k, []).get(k) as number[]).push(t);
          if (k.startsWith('load')) rss.set(`restore ${k}`, Math.max(rss.get(`restore ${k}`) ?? 0, this.stats().maxRssKiB));
          log(`cold restore run ${i + 1}: ${k} ${ms(t)}`);
        } finally {
          await dst.stop();
        }
      }
    }
    const cb = (k: string) => timing(cold.get(k) as number[]).best;
    const catCold = cb('`-incoming exec:cat STREAM`');
    for (const [k] of coldRuns.slice(1)) {
      this.rows.push(ratioRow(`cold restore: ${k} (vs \`-incoming exec:cat STREAM\`)`, cb(k), ms(cb(k)), catCold, ms(catCold), k.startsWith('load') ? { max: 0.8 } : undefined));
    }
    const aioCold = cb('load --cache=none --aio=native');
    this.rows.push(ratioRow('cold restore: load --cache=none --aio=native (vs --aio=threads)', aioCold, ms(aioCold), cb('load --cache=none'), ms(cb('load --cache=none'))));
    const uringCold = cb('load --cache=none --aio=io_uring');
    this.rows.push(ratioRow('cold restore: load --cache=none --aio=io_uring (vs --aio=threads)', uringCold, ms(uringCold), cb('load --cache=none'), ms(cb('load --cache=none'))));
    for (const [name, kib] of rss) {
      if (name.startsWith('pipe') || name.startsWith('restore')) {
        this.rows.push({ what: `peak RSS of ${name}`, ours: `${(kib / 1024).toFixed(0)} MiB`, versus: '', ratio: null, target: '≤ 128 MiB', met: kib <= 128 * 1024 });
      }
    }
    rmQuiet(saved);
    rmQuiet(mappedFile);
  }

  rssRows(): void {
    // ru_maxrss is in KiB; the target is 256 MiB whatever the VM size.
    const limitKiB = 256 * 1024;
    for (const [what, kib] of [['save', this.saveRss], ['load', this.loadRss]] as const) {
      if (kib === 0) continue; // not measured (--only cache has rows of its own)
      this.rows.push({ what: `peak RSS of ${what} (pipe and QEMU runs)`, ours: `${(kib / 1024).toFixed(0)} MiB`, versus: '', ratio: null, target: '≤ 256 MiB', met: kib <= limitKiB });
    }
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new BenchError(`${what}: no answer within ${ms / 1000} s`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Frames the whole stream file into records and drops them; ms. */
function timeFramer(file: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const framer = new MigrationFramer();
    const sink = new Writable({
      highWaterMark: 4 * MiB,
      write(_r: unknown, cb: (err: Error | null) => void) {
        cb(null);
      },
    });
    const src = fs.createReadStream(file, { highWaterMark: MiB });
    src.on('error', reject);
    framer.on('error', reject);
    sink.on('error', reject);
    sink.on('finish', () => resolve(performance.now() - t0));
    src.pipe(framer as unknown as NodeJS.WritableStream);
    framer.pipe(sink);
  });
}

/** The parts `--only` can pick. */
const PARTS = ['save-pipe', 'load-pipe', 'framer', 'qemu-save', 'qemu-restore', 'postcopy', 'cache', 'channels'];

async function main(): Promise<void> {
  const args = minimist(process.argv.slice(2), { boolean: ['quick', 'help', 'big'], string: ['runs', 'dir', 'json', 'md', 'only', 'channels'], default: { big: true } });
  if (args.help) {
    process.stdout.write(`usage: node dist/bench/run.js [--quick] [--runs N] [--dir TMPDIR] [--json FILE] [--md FILE] [--only ${PARTS.join(',')}] [--channels 1,2,4] [--no-big]\n`);
    return;
  }
  const only = typeof args.only === 'string' ? args.only.split(',') : PARTS;
  for (const p of only) if (!PARTS.includes(p)) throw new BenchError(`--only: '${p}' is not one of ${PARTS.join(', ')}`);
  requireQemu();
  const quick = args.quick === true;
  const runs = args.runs === undefined ? 3 : Number(args.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 50) throw new BenchError(`--runs: '${args.runs}' is not a whole number from 1 to 50`);
  const memMiB = quick ? 512 : 2048;
  const dataMiB = quick ? 256 : 1024;
  const base = typeof args.dir === 'string' ? args.dir : (await import('node:os')).tmpdir();
  // Pattern, stream, image, a cat copy, an exec: copy and the savevm disk can coexist.
  const need = 7 * dataMiB * MiB;
  if (freeBytes(base) < need) throw new BenchError(`${base}: ${mib(freeBytes(base))} free, the benchmark needs ${mib(need)}`);
  const dir = fs.mkdtempSync(path.join(base, 'qemu-snap-bench-'));
  const cleanup = () => rmQuiet(dir);
  process.on('exit', cleanup);
  const accel = defaultAccel();
  const t0 = performance.now();
  const b = new Bench({ memMiB, dataMiB, runs, dir });
  try {
    await b.prepare();
    // load-pipe and qemu-restore need the image save-pipe makes.
    if (only.some((p) => p !== 'framer' && p !== 'qemu-save' && p !== 'cache' && p !== 'channels')) await b.savePipe();
    if (only.includes('load-pipe')) await b.loadPipe();
    if (only.includes('framer')) await b.framer();
    if (only.includes('qemu-save')) await b.qemuSave();
    if (only.includes('qemu-restore') || only.includes('postcopy')) await b.qemuRestore();
    if (only.includes('postcopy')) await b.postcopy();
    if (only.includes('cache')) await b.cacheModes();
    if (only.includes('channels')) {
      const channels = String(args.channels ?? '1,2,4').split(',').map(Number);
      if (channels.some((n) => !Number.isInteger(n) || n < 1 || n > 64)) throw new BenchError(`--channels: '${args.channels}' is not a list of channel counts`);
      const c = new ChannelsBench({ memMiB, dataMiB, runs, dir, pattern: b.pattern, channels, big: !quick && args.big !== false, log });
      await c.run();
      b.rows.push(...c.rows);
      b.notes.push(...c.notes);
    }
    b.rssRows();
  } finally {
    cleanup();
  }
  const machine = machineInfo(accel);
  const title = `${quick ? 'quick' : 'full'}: ${memMiB} MiB VM, ${dataMiB} MiB of random data, paused, best of ${runs}`;
  const text = [`### ${title}`, '', `Machine: ${formatMachine(machine)}`, '', formatTable(b.rows), ...b.notes.map((n) => `- ${n}`), `- whole benchmark: ${ms(performance.now() - t0)}`, ''].join('\n');
  process.stdout.write(text + '\n');
  if (typeof args.md === 'string') fs.writeFileSync(args.md, text + '\n');
  if (typeof args.json === 'string') fs.writeFileSync(args.json, JSON.stringify({ title, machine, rows: b.rows, notes: b.notes }, null, 2) + '\n');
  const missed = b.rows.filter((r) => r.met === false).length;
  if (missed > 0) log(`${missed} target(s) not met`);
}

main().catch((err: Error) => {
  process.stderr.write(`bench: ${err instanceof BenchError ? err.message : (err.stack ?? String(err))}\n`);
  process.exit(1);
});
