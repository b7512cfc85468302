// Shared bits of qemu-snap's own end-to-end tests: the compiled CLI, as a
// child process or as an exec: URI for QEMU.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { shellQuote, diffRanges, defaultAccel } from './lib';

export const CLI = path.resolve(__dirname, '..', '..', 'cli', 'qemu-snap.js');

/** `exec:` URI body that runs qemu-snap with these (already quoted) arguments. */
export function snapExec(args: string): string {
  return `exec:${shellQuote(process.execPath)} ${shellQuote(CLI)} ${args}`;
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
  ms: number;
}

/** Runs the CLI; `input` is a file path or a Buffer for stdin. */
export function runCli(args: string[], opts: { input?: string | Buffer; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => (err += s));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`qemu-snap ${args.join(' ')} did not finish within ${opts.timeoutMs ?? 60_000} ms; stderr: ${err}`));
    }, opts.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr: err, ms: Date.now() - t0 });
    });
    child.stdin.on('error', () => undefined);
    if (typeof opts.input === 'string') fs.createReadStream(opts.input).pipe(child.stdin);
    else if (opts.input) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `qemu-snap-${prefix}-`));
}

/** The one line a failing command must print: no stack trace, prefixed. */
export function isOneLineError(stderr: string): boolean {
  const lines = stderr.trim().split('\n');
  return lines.length === 1 && lines[0].startsWith('qemu-snap: ') && !/\n\s+at /.test(stderr);
}

/**
 * Compares two guest memory dumps. A guest that has run under KVM gets its
 * 32-byte kvmclock structure rewritten by KVM on the destination when the
 * clock state is loaded (docs/qemu-facts.md): for such guests bytes within one
 * 32-byte window may differ. Returns a description of what differs, or null.
 */
export function memoryDifference(a: string, b: string, ranRunning: boolean): string | null {
  const ranges = diffRanges(a, b, 4, 0);
  if (ranges.length === 0) return null;
  const span = ranges[ranges.length - 1][1] - ranges[0][0];
  if (ranRunning && defaultAccel() === 'kvm' && ranges.length < 4 && span <= 32) return null;
  return `memory differs at ${ranges.map(([s, e]) => `0x${s.toString(16)}..0x${e.toString(16)}`).join(', ')}`;
}
