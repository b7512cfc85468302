// Mutation testing of the real CLI over real QEMU streams and the images made
// from them: truncations, bit flips and overwrites aimed at each part of the
// stream (header, configuration, leader, RAM records, footers, device state,
// tail) and of the image (qcow2 header, L1/L2, refcounts, STVM header, saved
// leader, device state, data). Every case runs `dist/cli/qemu-snap.js` as a
// child and must end cleanly: exit 0 with a sound result, or exit 1 with one
// line on stderr and nothing left behind. Crashes, signals, hangs, stack
// traces and "internal error" lines are failures.
//
//   node dist/bench/mutate.js --seed N --cases M [--kind save|load] [--jobs 2]
//        [--check-every 25] [--keep DIR] [--mem 64] [--pattern 4]
//
// The e2e suite test/e2e/reliability-mutate.test.ts runs a few hundred cases
// through the same functions.
import * as fs from 'node:fs';
import { prng } from '../test/helpers';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, execFileSync } from 'node:child_process';
import minimist from 'minimist';
import { startVm, makePattern, shellQuote, QEMU_IMG } from '../test/e2e/lib';
import { CLI } from '../test/e2e/common';
import { parseRecords } from '../src/snapshot/snapshot-image';
import { isRefusalNotice } from '../src/snapshot/refusal';
import type { MigrationRecord } from '../src/migration/records';

// ---- deterministic randomness ---------------------------------------------

export type Rng = () => number;

export const makeRng: (seed: number) => Rng = prng;

const int = (rng: Rng, n: number): number => Math.floor(rng() * n);
const pick = <T>(rng: Rng, xs: readonly T[]): T => xs[int(rng, xs.length)];

// ---- regions ----------------------------------------------------------------

/** A named byte range [start, end) of a file, with sub-ranges to aim at. */
export interface Region {
  kind: string;
  ranges: Array<[number, number]>;
}

/** Where each part of a real stream lies, found by running it through the framer. */
export async function mapStream(stream: Buffer): Promise<Region[]> {
  const records: MigrationRecord[] = await parseRecords(stream);
  const regions = new Map<string, Array<[number, number]>>();
  const add = (kind: string, a: number, b: number) => {
    if (b > a) (regions.get(kind) ?? regions.set(kind, []).get(kind)!).push([a, b]);
  };
  let firstPart = -1;
  let ramStart = -1;
  let deviceStart = -1;
  let eof = -1;
  for (let i = 0; i < records.length; i++) {
    const r = records[i];
    const next = i + 1 < records.length ? records[i + 1].offset : stream.length;
    switch (r.type) {
      case 'header': add('header', 0, 8); break;
      case 'configuration': add('config', r.offset, next); break;
      case 'command': add('leader', r.offset, next); break;
      case 'section-start': ramStart = r.offset; break;
      case 'section-part':
      case 'section-end':
        if (firstPart < 0) firstPart = r.offset;
        add('footer', r.offset, r.offset + 5);
        break;
      case 'ram-page':
      case 'ram-zero':
        add('ramhdr', r.offset, r.offset + 8);
        if (!r.continued) add('idstr', r.offset + 8, r.offset + 9 + r.block.id.length);
        if (r.type === 'ram-page') add('pagedata', next - r.data.length, next);
        else add('ramhdr', next - 1, next);
        break;
      case 'ram-eos':
      case 'section-footer': add('footer', r.offset, next); break;
      case 'device-state': if (deviceStart < 0) deviceStart = r.offset; break;
      case 'eof': eof = r.offset; break;
      default: break;
    }
  }
  if (ramStart < 0 || firstPart < 0 || deviceStart < 0 || eof < 0) throw new Error('mapStream: not a complete precopy stream');
  add('leader', ramStart, firstPart);
  add('device', deviceStart, eof);
  add('tail', eof, stream.length);
  return [...regions].map(([kind, ranges]) => ({ kind, ranges }));
}

/** Byte ranges of a qcow2 snapshot image, read from its own metadata (independently of src/image). */
export function mapImage(img: Buffer): Region[] {
  const u64 = (at: number) => img.readUInt32BE(at) * 2 ** 32 + img.readUInt32BE(at + 4);
  const entryOffset = (at: number) => (img.readUInt32BE(at) & 0x00ffffff) * 2 ** 32 + ((img.readUInt32BE(at + 4) & 0xfffffe00) >>> 0);
  const cs = 2 ** img.readUInt32BE(20);
  const virtualSize = u64(24);
  const l1Size = img.readUInt32BE(36);
  const l1Offset = u64(40);
  const rtOffset = u64(48);
  const rtClusters = img.readUInt32BE(56);
  const l2Entries = cs / 8;
  const vmIndex = Math.ceil(virtualSize / (cs * l2Entries));
  const out: Region[] = [];
  // Header fields, one range each, so every field gets its share of cases.
  const fields: Array<[number, number]> = [[0, 4], [4, 8], [8, 16], [16, 20], [20, 24], [24, 32], [32, 36], [36, 40], [40, 48], [48, 56], [56, 60], [60, 64], [64, 72], [72, 80], [80, 88], [88, 96], [96, 100], [100, 104], [104, 112]];
  out.push({ kind: 'qcow2-header', ranges: fields });
  out.push({ kind: 'l1', ranges: [[l1Offset, l1Offset + l1Size * 8]] });
  const l2Data: Array<[number, number]> = [];
  const dataClusters: Array<[number, number]> = [];
  for (let i = 0; i < Math.min(l1Size, vmIndex); i++) {
    const t = entryOffset(l1Offset + i * 8);
    if (t === 0) continue;
    for (let j = 0; j < l2Entries; j++) {
      const e = t + j * 8;
      const host = entryOffset(e);
      if (host === 0) continue;
      l2Data.push([e, e + 8]);
      dataClusters.push([host, Math.min(host + cs, img.length)]);
    }
  }
  out.push({ kind: 'l2', ranges: l2Data });
  out.push({ kind: 'data', ranges: dataClusters });
  const vmTable = entryOffset(l1Offset + vmIndex * 8);
  if (vmTable === 0) throw new Error('mapImage: no VM state L2 table');
  const vmHost = (off: number) => entryOffset(vmTable + Math.floor(off / cs) * 8) + (off % cs);
  const l2Vm: Array<[number, number]> = [];
  for (let j = 0; j < l2Entries; j++) if (entryOffset(vmTable + j * 8) !== 0) l2Vm.push([vmTable + j * 8, vmTable + j * 8 + 8]);
  out.push({ kind: 'l2-vmstate', ranges: l2Vm });
  const stvm = vmHost(0);
  out.push({ kind: 'stvm', ranges: [[stvm, stvm + 4], [stvm + 4, stvm + 8], [stvm + 8, stvm + 16], [stvm + 16, stvm + 20], [stvm + 20, stvm + 24], [stvm + 24, stvm + 28]] });
  const leaderLength = img.readUInt32BE(stvm + 20);
  const stateLength = img.readUInt32BE(stvm + 24);
  // Byte ranges in the VM state area, split at cluster boundaries.
  const vmRanges = (a: number, b: number): Array<[number, number]> => {
    const r: Array<[number, number]> = [];
    for (let p = a; p < b; ) {
      const n = Math.min(b - p, cs - (p % cs));
      r.push([vmHost(p), vmHost(p) + n]);
      p += n;
    }
    return r;
  };
  out.push({ kind: 'leader', ranges: vmRanges(28, 28 + leaderLength) });
  out.push({ kind: 'device', ranges: vmRanges(28 + leaderLength, 28 + stateLength) });
  out.push({ kind: 'refcount-table', ranges: [[rtOffset, rtOffset + rtClusters * cs]] });
  const blocks: Array<[number, number]> = [];
  for (let i = 0; i < (rtClusters * cs) / 8; i++) {
    const b = u64(rtOffset + i * 8);
    if (b !== 0) blocks.push([b, b + cs]);
  }
  out.push({ kind: 'refcount-block', ranges: blocks });
  return out.filter((r) => r.ranges.length > 0);
}

// ---- mutations --------------------------------------------------------------

export interface Mutation {
  kind: string;
  op: string;
  /** Human-readable: what changed where, to reproduce a failure by hand. */
  desc: string;
  data: Buffer;
}

/** Values that make length and count fields absurd, or just off by one. */
const WORDS = [0, 1, 0xff, 0x100, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffff0, 0x10000, 0x1000000];

function offsetIn(rng: Rng, region: Region): { at: number; range: [number, number] } {
  const range = pick(rng, region.ranges);
  return { at: range[0] + int(rng, range[1] - range[0]), range };
}

/**
 * One mutation of `base` aimed at `region`: truncation inside it, 1–3 bit
 * flips, a byte overwrite, or an absurd be32 written over a field.
 */
export function mutate(base: Buffer, region: Region, rng: Rng, ops = ['truncate', 'flip', 'byte', 'word']): Mutation {
  const op = pick(rng, ops);
  const { at, range } = offsetIn(rng, region);
  if (op === 'truncate') {
    return { kind: region.kind, op, desc: `truncate at ${at} of ${base.length}`, data: base.subarray(0, at) };
  }
  const data = Buffer.from(base);
  if (op === 'flip') {
    const n = 1 + int(rng, 3);
    const bits: string[] = [];
    for (let i = 0; i < n; i++) {
      const p = i === 0 ? at : range[0] + int(rng, range[1] - range[0]);
      const bit = int(rng, 8);
      data[p] ^= 1 << bit;
      bits.push(`${p}.${bit}`);
    }
    return { kind: region.kind, op, desc: `flip bits ${bits.join(',')}`, data };
  }
  if (op === 'byte') {
    const v = pick(rng, [0x00, 0xff, 0x7e, 0x01, int(rng, 256)]);
    data[at] = v;
    return { kind: region.kind, op, desc: `byte ${at} := 0x${v.toString(16)} (was 0x${base[at].toString(16)})`, data };
  }
  // A be32 over the field: aligned to the range start when the range is a field.
  const p = range[1] - range[0] <= 8 ? range[0] + (range[1] - range[0] === 8 && rng() < 0.5 ? 4 : 0) : at;
  const v = rng() < 0.2 ? (base.length > p + 4 ? (base.readUInt32BE(p) + 1) >>> 0 : 1) : pick(rng, WORDS);
  if (p + 4 > data.length) return mutate(base, region, rng, ['flip']);
  data.writeUInt32BE(v, p);
  return { kind: region.kind, op: 'word', desc: `be32 at ${p} := 0x${v.toString(16)}`, data };
}

/** Truncation anywhere in the file (not aimed at a region). */
export function truncateAnywhere(base: Buffer, rng: Rng): Mutation {
  const at = int(rng, base.length);
  return { kind: 'truncate', op: 'truncate', desc: `truncate at ${at} of ${base.length}`, data: base.subarray(0, at) };
}

// ---- running the CLI --------------------------------------------------------

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  stdout: Buffer;
  stderr: string;
  ms: number;
}

/** Runs the compiled CLI; a run past `timeoutMs` is killed and reported as timed out. */
export function runCliCase(args: string[], opts: { stdin?: Buffer; timeoutMs?: number; nodeArgs?: string[] } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const child = spawn(process.execPath, [...(opts.nodeArgs ?? []), CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    let timedOut = false;
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => (err += s));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 10_000);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, timedOut, stdout: Buffer.concat(out), stderr: err, ms: Date.now() - t0 });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.stdin ?? Buffer.alloc(0));
  });
}

/** Why a finished run is not a clean failure, or null when it is one line, exit 1, no trace. */
export function badFailure(r: RunResult): string | null {
  if (r.timedOut) return 'hang (killed after the timeout)';
  if (r.signal) return `killed by ${r.signal}`;
  if (r.code !== 1) return `exit ${r.code}, expected 1`;
  const lines = r.stderr.trim().split('\n');
  if (lines.length !== 1) return `${lines.length} lines on stderr`;
  if (!lines[0].startsWith('qemu-snap: ')) return 'stderr line without the qemu-snap: prefix';
  if (/internal error/.test(lines[0])) return 'internal error (an unexpected exception)';
  if (/\n\s+at /.test(r.stderr)) return 'stack trace';
  return null;
}

export function qemuImgCheck(image: string): string | null {
  try {
    const out = execFileSync(QEMU_IMG, ['check', image], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    return /No errors were found/.test(out) && !/leaked/.test(out) ? null : `qemu-img check: ${out.trim().split('\n').join(' | ')}`;
  } catch (err) {
    const e = err as { stdout?: string; message: string };
    return `qemu-img check failed: ${(e.stdout ?? e.message).trim().split('\n').slice(0, 3).join(' | ')}`;
  }
}

/** Runs `fn` over `items` with at most `jobs` at a time. */
export async function pool<T>(items: number, jobs: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = new Array(items);
  let next = 0;
  const worker = async () => {
    while (next < items) {
      const i = next++;
      out[i] = await fn(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(jobs, items) }, worker));
  return out;
}

// ---- the two kinds of cases -------------------------------------------------

export interface CaseOutcome {
  kind: string;
  op: string;
  desc: string;
  /** 'ok' (exit 0, result sound), 'refused' (clean exit 1), or a failure. */
  result: 'ok' | 'refused' | 'fail';
  why?: string;
  stderr?: string;
  ms: number;
}

/** Picks a region of a kind; `weights` gives each kind's share of cases. */
function pickRegion(rng: Rng, regions: Region[], weights: Record<string, number>): Region | null {
  const avail = regions.filter((r) => (weights[r.kind] ?? 0) > 0);
  const total = avail.reduce((a, r) => a + weights[r.kind], 0) + (weights.truncate ?? 0);
  let x = rng() * total;
  for (const r of avail) {
    x -= weights[r.kind];
    if (x < 0) return r;
  }
  return null; // truncation anywhere
}

/** The damage seed `seed` picks: a region by weight (or a truncation anywhere), then what to do to it. */
function caseMutation(base: Buffer, regions: Region[], seed: number, weights: Record<string, number>): Mutation {
  const rng = makeRng(seed);
  const region = pickRegion(rng, regions, weights);
  return region ? mutate(base, region, rng) : truncateAnywhere(base, rng);
}

/** A case's outcome, as refused until its checks say otherwise. */
function refusedOutcome(m: Mutation, seed: number, r: { ms: number; stderr: string }): CaseOutcome {
  return { kind: m.kind, op: m.op, desc: `seed ${seed}: ${m.desc}`, result: 'refused', ms: r.ms, stderr: r.stderr.trim() };
}

export const SAVE_WEIGHTS: Record<string, number> = { header: 1, config: 2, leader: 4, ramhdr: 4, idstr: 2, pagedata: 1, footer: 3, device: 2, tail: 3, truncate: 3 };

export interface SaveCaseOptions {
  /** Run qemu-img check on an image that was saved. */
  check: boolean;
  workDir: string;
  timeoutMs?: number;
}

/** One save case: the mutated stream on stdin, into an empty directory. */
export async function saveCase(base: Buffer, regions: Region[], seed: number, opts: SaveCaseOptions): Promise<CaseOutcome> {
  const m = caseMutation(base, regions, seed, SAVE_WEIGHTS);
  const dir = fs.mkdtempSync(path.join(opts.workDir, 'save-'));
  try {
    const image = path.join(dir, 'vm.qcow2');
    const r = await runCliCase(['save', '-q', image], { stdin: m.data, timeoutMs: opts.timeoutMs });
    const o = refusedOutcome(m, seed, r);
    const left = fs.readdirSync(dir);
    if (r.code === 0 && !r.timedOut) {
      o.result = 'ok';
      if (left.length !== 1 || left[0] !== 'vm.qcow2') return { ...o, result: 'fail', why: `exit 0 but the directory holds [${left.join(', ')}]` };
      if (r.stderr !== '') return { ...o, result: 'fail', why: 'exit 0 with -q but stderr is not empty' };
      if (opts.check) {
        const bad = qemuImgCheck(image);
        if (bad) return { ...o, result: 'fail', why: bad };
      }
      // What save accepted it must be able to check and load back.
      const v = await runCliCase(['verify', '-q', image], { timeoutMs: opts.timeoutMs });
      if (v.code !== 0) return { ...o, result: 'fail', why: `exit 0 but verify of the image says: ${v.stderr.trim()}` };
      return o;
    }
    const bad = badFailure(r);
    if (bad) return { ...o, result: 'fail', why: bad };
    if (left.length !== 0) return { ...o, result: 'fail', why: `exit 1 left [${left.join(', ')}] behind` };
    return o;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export const LOAD_WEIGHTS: Record<string, number> = {
  'qcow2-header': 4, l1: 2, l2: 3, 'l2-vmstate': 2, 'refcount-table': 2, 'refcount-block': 2, stvm: 4, leader: 4, device: 2, data: 1, truncate: 2,
};
/** Damage here is in metadata that load reads and checks before it sends a byte. */
const CHECKED_BEFORE_STREAMING = new Set(['qcow2-header', 'l1', 'l2-vmstate', 'refcount-table', 'refcount-block', 'stvm', 'leader']);

export interface LoadCaseOptions {
  workDir: string;
  /** `load` output of the undamaged image. */
  baseline: Buffer;
  timeoutMs?: number;
  /** More load options (the suite's check of the oracle itself runs --no-verify). */
  loadArgs?: string[];
  /** Share of cases per region kind (default LOAD_WEIGHTS). */
  weights?: Record<string, number>;
}

/** Where two streams first differ, for a failure line. */
export function describeDifference(got: Buffer, want: Buffer): string {
  const n = Math.min(got.length, want.length);
  let i = 0;
  while (i < n && got[i] === want[i]) i++;
  return `${got.length} bytes against ${want.length}, first difference at byte ${i}`;
}

/** One load case: a damaged copy of the image, the stream to stdout. */
export async function loadCase(base: Buffer, regions: Region[], seed: number, opts: LoadCaseOptions): Promise<CaseOutcome> {
  const m = caseMutation(base, regions, seed, opts.weights ?? LOAD_WEIGHTS);
  const dir = fs.mkdtempSync(path.join(opts.workDir, 'load-'));
  try {
    const image = path.join(dir, 'vm.qcow2');
    fs.writeFileSync(image, m.data);
    const r = await runCliCase(['load', '-q', ...(opts.loadArgs ?? []), image], { timeoutMs: opts.timeoutMs });
    const o = refusedOutcome(m, seed, r);
    if (r.code === 0 && !r.timedOut) {
      o.result = 'ok';
      // Strict: with RAM digests and the state's CRC, damage that load does
      // not refuse must be damage that changes nothing it sends (unused
      // bytes, refcounts it does not read). A stream that merely parses is
      // not good enough: a load without its digest check would pass that.
      if (r.stdout.equals(opts.baseline)) return o;
      return { ...o, result: 'fail', why: `exit 0 but the stream differs from the undamaged image's (${describeDifference(r.stdout, opts.baseline)})` };
    }
    const bad = badFailure(r);
    if (bad) return { ...o, result: 'fail', why: bad };
    // Refused before streaming: the consumer gets the refusal notice and nothing else.
    if (CHECKED_BEFORE_STREAMING.has(m.kind) && r.stdout.length > 0 && !isRefusalNotice(r.stdout)) {
      return { ...o, result: 'fail', why: `exit 1 after ${r.stdout.length} bytes on stdout (damage in ${m.kind} is detectable before streaming)` };
    }
    return o;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---- fixtures -----------------------------------------------------------------

/** Captures a precopy stream of a small paused VM holding `patternMiB` of random data. */
export async function captureStream(file: string, memMiB = 64, patternMiB = 4, seed = 7): Promise<void> {
  const pattern = `${file}.pattern`;
  makePattern(pattern, patternMiB << 20, seed);
  try {
    const vm = await startVm({ machine: 'pc', memMiB, loads: [{ file: pattern, addr: 8 << 20 }] });
    try {
      await vm.migrate(`exec:cat > ${shellQuote(file)}`, { timeoutMs: 60_000 });
    } finally {
      await vm.stop();
    }
  } finally {
    fs.rmSync(pattern, { force: true });
  }
}

export interface Tally {
  byKind: Map<string, { ok: number; refused: number; fail: number }>;
  failures: CaseOutcome[];
}

export function tally(outcomes: CaseOutcome[]): Tally {
  const byKind = new Map<string, { ok: number; refused: number; fail: number }>();
  const failures: CaseOutcome[] = [];
  for (const o of outcomes) {
    const t = byKind.get(o.kind) ?? byKind.set(o.kind, { ok: 0, refused: 0, fail: 0 }).get(o.kind)!;
    t[o.result]++;
    if (o.result === 'fail') failures.push(o);
  }
  return { byKind, failures };
}

export function formatTally(title: string, t: Tally): string {
  const lines = [`${title}`, '  kind              cases      ok  refused  failed'];
  let sum = 0;
  for (const [k, v] of [...t.byKind].sort()) {
    const n = v.ok + v.refused + v.fail;
    sum += n;
    lines.push(`  ${k.padEnd(16)} ${String(n).padStart(6)} ${String(v.ok).padStart(7)} ${String(v.refused).padStart(8)} ${String(v.fail).padStart(7)}`);
  }
  lines.push(`  total            ${String(sum).padStart(6)}`);
  return lines.join('\n');
}

// ---- command line -------------------------------------------------------------

async function main(): Promise<void> {
  const args = minimist(process.argv.slice(2), { boolean: ['verbose'], string: ['seed', 'cases', 'kind', 'jobs', 'check-every', 'keep', 'mem', 'pattern', 'stream'] });
  const seed = Number(args.seed ?? 1);
  const cases = Number(args.cases ?? 1000);
  const jobs = Number(args.jobs ?? Math.max(1, os.cpus().length));
  const checkEvery = Number(args['check-every'] ?? 25);
  const kinds = args.kind ? [String(args.kind)] : ['save', 'load'];
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-mutate-'));
  const cleanup = () => fs.rmSync(work, { recursive: true, force: true });
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    let streamFile = args.stream ? path.resolve(String(args.stream)) : path.join(work, 'vm.stream');
    if (!args.stream) await captureStream(streamFile, Number(args.mem ?? 64), Number(args.pattern ?? 4), seed);
    const stream = fs.readFileSync(streamFile);
    const perKind = kinds.length === 2 ? [Math.ceil(cases / 2), Math.floor(cases / 2)] : [cases];
    console.log(`stream: ${stream.length} bytes; seed ${seed}; ${cases} cases; ${jobs} jobs`);
    let failed = 0;
    for (let k = 0; k < kinds.length; k++) {
      const kind = kinds[k];
      const n = perKind[k];
      const t0 = Date.now();
      let outcomes: CaseOutcome[];
      let progress = 0;
      const tick = () => {
        if (++progress % 500 === 0) process.stderr.write(`  ${kind}: ${progress}/${n} (${Math.round((Date.now() - t0) / 1000)} s)\n`);
      };
      if (kind === 'save') {
        const regions = await mapStream(stream);
        outcomes = await pool(n, jobs, async (i) => {
          const o = await saveCase(stream, regions, seed * 1_000_003 + i, { workDir: work, check: i % checkEvery === 0 });
          tick();
          return o;
        });
      } else {
        const image = path.join(work, 'base.qcow2');
        const s = await runCliCase(['save', '-q', image], { stdin: stream, timeoutMs: 60_000 });
        if (s.code !== 0) throw new Error(`save of the unmutated stream failed: ${s.stderr}`);
        const base = fs.readFileSync(image);
        const l = await runCliCase(['load', '-q', image], { timeoutMs: 60_000 });
        if (l.code !== 0) throw new Error(`load of the unmutated image failed: ${l.stderr}`);
        const regions = mapImage(base);
        outcomes = await pool(n, jobs, async (i) => {
          const o = await loadCase(base, regions, seed * 1_000_003 + i, { workDir: work, baseline: l.stdout });
          tick();
          return o;
        });
      }
      const t = tally(outcomes);
      console.log(formatTally(`${kind}: ${n} cases in ${Math.round((Date.now() - t0) / 1000)} s`, t));
      const seen = new Set<string>();
      for (const f of t.failures) {
        const key = `${f.kind} ${f.why} ${f.stderr?.split('\n')[0].replace(/\d+/g, 'N')}`;
        if (seen.has(key)) continue;
        seen.add(key);
        console.log(`  FAIL ${f.kind}/${f.op} ${f.desc}: ${f.why}\n       stderr: ${f.stderr?.split('\n').slice(0, 4).join(' | ')}`);
      }
      failed += t.failures.length;
      if (args.verbose) {
        const msgs = new Map<string, string>();
        for (const o of outcomes) {
          if (o.result === 'fail') continue;
          const key = `${o.kind} ${o.result} ${(o.stderr ?? '').replace(/\d+|0x[0-9a-f]+/g, 'N').slice(0, 90)}`;
          if (!msgs.has(key)) msgs.set(key, `${o.desc}: ${o.stderr}`);
        }
        for (const [k, v] of [...msgs].sort()) console.log(`  ${k}\n      e.g. ${v.slice(0, 300)}`);
      }
    }
    if (args.keep) fs.cpSync(work, path.resolve(String(args.keep)), { recursive: true });
    process.exitCode = failed > 0 ? 1 : 0;
  } finally {
    cleanup();
  }
}

if (require.main === module) {
  main().catch((err) => {
    console.error(err instanceof Error ? err.stack ?? err.message : String(err));
    process.exit(1);
  });
}
