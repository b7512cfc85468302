// Shared by the qcow2*.test.ts suites: temp dirs and the real QEMU tools as oracles.
import { spawnSync } from 'child_process';
import { mkdtempSync, openSync, readSync, closeSync, rmSync } from 'fs';
import { tmpdir } from 'os';
import { join } from 'path';
import { Qcow2Error } from '../../src/image';

export function tempDir(tag: string): { dir: string; file: (name: string) => string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), `qcow2-${tag}-`));
  return { dir, file: (name) => join(dir, name), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export function run(cmd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export function mustRun(cmd: string, args: string[]): string {
  const r = run(cmd, args);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export interface CheckResult {
  status: number;
  text: string;
  allocatedClusters: number;
}

/** `qemu-img check`: exit status, its text, and the allocated-clusters count from the JSON form. */
export function qemuCheck(path: string): CheckResult {
  const text = run('qemu-img', ['check', path]);
  const json = run('qemu-img', ['check', '--output=json', path]);
  const parsed = JSON.parse(json.stdout) as { 'allocated-clusters': number };
  return { status: text.status, text: text.stdout + text.stderr, allocatedClusters: parsed['allocated-clusters'] };
}

export function qemuInfo(path: string): { 'virtual-size': number; 'cluster-size': number; format: string } {
  return JSON.parse(mustRun('qemu-img', ['info', '--output=json', path]));
}

/** Allocated (data) runs as `qemu-img map` sees them, merged. */
export function qemuMap(path: string): Array<{ offset: number; length: number; allocated: boolean }> {
  const rows = JSON.parse(mustRun('qemu-img', ['map', '--output=json', path])) as Array<{ start: number; length: number; data: boolean }>;
  const out: Array<{ offset: number; length: number; allocated: boolean }> = [];
  for (const r of rows) {
    const last = out[out.length - 1];
    if (last && last.allocated === r.data && last.offset + last.length === r.start) last.length += r.length;
    else out.push({ offset: r.start, length: r.length, allocated: r.data });
  }
  return out;
}

/** Convert to a (sparse) raw file with QEMU and return its path. */
export function toRaw(image: string, raw: string): string {
  mustRun('qemu-img', ['convert', '-O', 'raw', image, raw]);
  return raw;
}

export function readRegion(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, buf, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return buf;
  } finally {
    closeSync(fd);
  }
}

/** Deterministic pseudo-random bytes (xorshift32), so failures reproduce. */
export function prng(seed: number): (n: number) => Buffer {
  let s = seed >>> 0 || 1;
  const next = (): number => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
  return (n: number) => {
    const b = Buffer.allocUnsafe(n);
    let i = 0;
    for (; i + 4 <= n; i += 4) b.writeUInt32LE(next(), i);
    for (; i < n; i++) b[i] = next() & 0xff;
    return b;
  };
}

export function randInt(rand: (n: number) => Buffer, max: number): number {
  return Math.floor((rand(4).readUInt32LE(0) / 4294967296) * max);
}

/** Await a promise that must reject with a Qcow2Error whose message matches. */
export async function rejectsWith(p: Promise<unknown>, pattern: RegExp): Promise<Error> {
  try {
    await p;
  } catch (err) {
    if (!(err instanceof Qcow2Error)) throw new Error(`expected a Qcow2Error, got ${String(err)}`);
    if (!pattern.test(err.message)) throw new Error(`message ${JSON.stringify(err.message)} does not match ${pattern}`);
    if (err.message.includes('\n')) throw new Error(`message is not one line: ${JSON.stringify(err.message)}`);
    return err;
  }
  throw new Error(`expected a rejection matching ${pattern}`);
}
