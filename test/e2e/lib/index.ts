// The e2e harness: drive real qemu-system-x86_64 from tests and benchmarks.
import * as path from 'node:path';

export * from './qmp';
export * from './vm';
export * from './pattern';
export * from './stream-peek';

/** Shell command for `migrate "exec:..."` that runs the fake destination (see fake-dest.ts). */
export function fakeDestCommand(outFile: string, logFile?: string): string {
  const script = path.join(__dirname, 'fake-dest.js');
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  return [process.execPath, script, outFile, ...(logFile ? [logFile] : [])].map(q).join(' ');
}

/** Shell-quote one word for exec: URIs. */
export function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}
export * from './linux-guest';
