// Timing helpers for the benchmarks: best-of-N, shell pipelines timed from
// node, the qemu-snap CLI's stats line (peak RSS, request latencies), the
// machine description and the results table.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { QemuSnapError } from '../src/errors';

/** A benchmark step failed (a command exited non-zero, a figure is missing). */
export class BenchError extends QemuSnapError {}

/** Best (smallest) of the samples and all of them, in ms. */
export interface Timing {
  best: number;
  all: number[];
}

export function timing(all: number[]): Timing {
  if (all.length === 0) throw new BenchError('no samples');
  return { best: Math.min(...all), all };
}

/** Runs `fn` `runs` times in a row and keeps every sample. */
export async function bestOf(runs: number, fn: (run: number) => Promise<number>): Promise<Timing> {
  const all: number[] = [];
  for (let i = 0; i < runs; i++) all.push(await fn(i));
  return timing(all);
}

/** Nearest-rank percentile (p in 0..100) of unsorted samples; NaN when empty. */
export function percentile(samples: number[], p: number): number {
  if (samples.length === 0) return NaN;
  const s = [...samples].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * s.length);
  return s[Math.min(s.length - 1, Math.max(0, rank - 1))];
}

export interface ShellResult {
  ms: number;
  stderr: string;
}

/** Runs a bash command line, rejects on a non-zero exit; wall time measured around the whole process. */
export function timeShell(command: string, env?: NodeJS.ProcessEnv, timeoutMs = 300_000): Promise<ShellResult> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn('bash', ['-o', 'pipefail', '-c', command], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
    let stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      stderr = (stderr + s).slice(-65_536);
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const ms = performance.now() - t0;
      if (code !== 0) reject(new BenchError(`'${command}' failed (${signal ?? `exit ${code}`}): ${stderr.trim().split('\n').slice(-3).join(' | ')}`));
      else resolve({ ms, stderr });
    });
  });
}

/** What `QEMU_SNAP_STATS=1 qemu-snap ...` prints on stderr at exit. */
export interface CliStats {
  cmd?: string;
  code: number;
  ms: number;
  /** Peak resident set of the qemu-snap process (getrusage ru_maxrss). */
  maxRssKiB: number;
  streamBytes?: number;
  dataPages?: number;
  requests?: { count: number; latenciesMs: number[] };
}

/** The last stats line in some stderr text (a string, or a file to read). */
export function parseStats(text: string): CliStats {
  const lines = text.split('\n').filter((l) => l.startsWith('qemu-snap-stats: '));
  if (lines.length === 0) throw new BenchError(`no qemu-snap-stats line in: ${text.trim().slice(-300)}`);
  return JSON.parse(lines[lines.length - 1].slice('qemu-snap-stats: '.length)) as CliStats;
}

export function statsFromFile(file: string): CliStats {
  return parseStats(fs.readFileSync(file, 'utf8'));
}

/** QEMU's file migration with mapped-ram (9.0 and later) is there to compare with. */
export function qemuHasMappedRam(binary: string): boolean {
  const v = /version (\d+)\./.exec(execFileSync(binary, ['--version'], { encoding: 'utf8' }));
  return v !== null && Number(v[1]) >= 9;
}

/** Drops the page cache (root only); false when it cannot. */
export function dropPageCache(): boolean {
  try {
    execFileSync('sync');
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

/** Shell-quote one word. */
export function q(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Free bytes for an unprivileged writer on the file system holding `dir`. */
export function freeBytes(dir: string): number {
  const st = fs.statfsSync(dir);
  return st.bavail * st.bsize;
}

/** Bytes a file really occupies on disk (holes excluded). */
export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

export function rmQuiet(file: string): void {
  fs.rmSync(file, { force: true, recursive: true });
}

export interface MachineInfo {
  date: string;
  cpus: number;
  cpuModel: string;
  ramGiB: number;
  qemu: string;
  accel: string;
  node: string;
  kernel: string;
}

export function machineInfo(accel: string): MachineInfo {
  let cpuModel = os.cpus()[0]?.model ?? 'unknown';
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) cpuModel = m[1].trim();
  } catch {
    // keep os.cpus()
  }
  // The QEMU the VMs run (QEMU_SNAP_QEMU, as test/e2e/lib takes it).
  const v = spawnSync(process.env.QEMU_SNAP_QEMU ?? 'qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  return {
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    cpus: os.cpus().length,
    cpuModel,
    ramGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    qemu: v.stdout?.split('\n')[0]?.trim() ?? 'unknown',
    accel,
    node: process.version,
    kernel: os.release(),
  };
}

/** One row of the results table. */
export interface Row {
  what: string;
  ours: string;
  versus: string;
  ratio: number | null;
  target: string;
  /** null: no target for this row. */
  met: boolean | null;
}

export function ms(t: number): string {
  return t >= 10_000 ? `${(t / 1000).toFixed(1)} s` : `${Math.round(t)} ms`;
}

export function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** Ratio row: ours / theirs, with a target "≤ max", "< below" (lower is better) or "≥ min" (higher is better). */
export function ratioRow(what: string, ours: number, oursText: string, theirs: number, theirsText: string, target?: { max?: number; min?: number; below?: number }): Row {
  const ratio = ours / theirs;
  let targetText = '';
  let met: boolean | null = null;
  if (target?.below !== undefined) {
    targetText = `< ${target.below}`;
    met = ratio < target.below;
  } else if (target?.max !== undefined) {
    targetText = `≤ ${target.max}`;
    met = ratio <= target.max;
  } else if (target?.min !== undefined) {
    targetText = `≥ ${target.min}`;
    met = ratio >= target.min;
  }
  return { what, ours: oursText, versus: theirsText, ratio, target: targetText, met };
}

/** A pipe inside a cell (`cat | cat`) would end it. */
function cell(text: string): string {
  return text.replace(/\|/g, '\\|');
}

export function formatTable(rows: Row[]): string {
  const head = '| measure | qemu-snap | compared with | ratio | target | met |\n|---|---|---|---|---|---|\n';
  return (
    head +
    rows
      .map((r) => `| ${cell(r.what)} | ${cell(r.ours)} | ${cell(r.versus)} | ${r.ratio === null ? '' : r.ratio.toFixed(2)} | ${r.target} | ${r.met === null ? '' : r.met ? 'yes' : '**no**'} |`)
      .join('\n') +
    '\n'
  );
}

export function formatMachine(m: MachineInfo): string {
  return `${m.date}; ${m.cpus} × ${m.cpuModel}; ${m.ramGiB} GiB RAM; ${m.qemu}, ${m.accel.toUpperCase()}; Node ${m.node}; Linux ${m.kernel}`;
}

/**
 * Touches `bytes` of free memory (a page-cache file, written and deleted)
 * so that the timed run right after it finds that memory backed by the host.
 * This machine's kernel has free page reporting on (virtio-balloon,
 * page_reporting_order=9): memory that stays free for ~2 s goes back to the
 * host, and the next process to use it pays for faulting it in again, up to
 * 1.3 s per GiB of system time (writing 1 GiB: 0.22 s warm, 1.49 s cold).
 * Which contender hit cold memory depended on what ran before it; warming
 * before every timed run puts them all on the same footing.
 */
export function warmMemory(dir: string, bytes: number): void {
  const file = path.join(dir, '.warm');
  const chunk = Buffer.alloc(1 << 20);
  const fd = fs.openSync(file, 'w');
  try {
    for (let done = 0; done < bytes; done += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, done);
  } finally {
    fs.closeSync(fd);
    fs.unlinkSync(file);
  }
}
