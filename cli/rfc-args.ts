// The RFC's command line, `qemu-snap [OPTIONS] save|load FILE`, with the
// options before the command: they are moved after it, where each command
// parses them. -V/--version and -h/--help work alone.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UsageError } from '../src/util/size';

/** Options that take a value as the next word (the RFC's and ours). */
const TAKES_VALUE = new Set(['-s', '--image-size', '-S', '--page-size', '-p', '--postcopy', '-i', '--input', '-o', '--output', '--cluster-size', '--max-in-flight', '--qmp', '--downtime-limit', '--max-bandwidth', '--cache', '--aio', '--host-page-size', '--channels']);

export function rfcArguments(argv: string[]): string[] {
  if (argv.length === 0 || !argv[0].startsWith('-') || argv[0] === '-') return argv;
  const lead: string[] = [];
  let i = 0;
  while (i < argv.length && argv[i].startsWith('-') && argv[i] !== '-') {
    const a = argv[i++];
    lead.push(a);
    if (TAKES_VALUE.has(a)) {
      if (i >= argv.length) throw new UsageError(`${a} needs a value`);
      lead.push(argv[i++]);
    }
  }
  if (lead.includes('-V') || lead.includes('--version')) return ['--version'];
  if (i >= argv.length) {
    if (lead.includes('-h') || lead.includes('--help')) return ['--help'];
    throw new UsageError('missing command (save, load, restore, info, verify)');
  }
  return [argv[i], ...lead, ...argv.slice(i + 1)];
}

/** The package's version, from its package.json (dist/cli/ → the package root). */
export function packageVersion(): string {
  for (const dir of [path.join(__dirname, '..', '..'), path.join(__dirname, '..')]) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'qemu-snap' && pkg.version) return pkg.version;
    } catch {
      // try the next place
    }
  }
  return 'unknown';
}

export function printVersion(out: NodeJS.WritableStream): void {
  out.write(`qemu-snap ${packageVersion()}\n`);
}
