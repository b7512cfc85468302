#!/usr/bin/env node
// Runs the compiled uvu suites (dist/test/**) one file at a time so that one
// crashing suite cannot hide the others, then prints `N passed, N failed`.
// Usage: node scripts/run-tests.mjs [unit|e2e] [filter]
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const kind = process.argv[2];
const filter = process.argv[3];
const root = new URL('../dist/test/', import.meta.url).pathname;
const dirs = kind ? [join(root, kind)] : [join(root, 'unit'), join(root, 'e2e')];

function walk(dir) {
  let out = [];
  let entries;
  try { entries = readdirSync(dir).sort(); } catch { return out; }
  for (const name of entries) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out = out.concat(walk(p));
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

let passed = 0;
let failed = 0;
const failedFiles = [];
for (const file of dirs.flatMap(walk)) {
  if (filter && !file.includes(filter)) continue;
  const rel = relative(root, file);
  process.stdout.write(`\n# ${rel}\n`);
  const r = spawnSync(process.execPath, [file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FORCE_COLOR: '0' } });
  process.stdout.write(r.stdout ?? '');
  const total = /Total:\s+(\d+)/.exec(r.stdout ?? '');
  const ok = /Passed:\s+(\d+)/.exec(r.stdout ?? '');
  const t = total ? Number(total[1]) : 0;
  const p = ok ? Number(ok[1]) : 0;
  passed += p;
  let f = t - p;
  // A suite that died before uvu printed its summary counts as one failure.
  if (r.status !== 0 && f === 0) f = 1;
  if (!total && r.status === 0) { process.stdout.write(`(no tests reported by ${rel})\n`); f += 1; }
  failed += f;
  if (f > 0) failedFiles.push(rel);
}
if (failedFiles.length) process.stdout.write(`\nfailing suites: ${failedFiles.join(', ')}\n`);
process.stdout.write(`\n${passed} passed, ${failed} failed\n`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
