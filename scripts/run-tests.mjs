#!/usr/bin/env node
// Runs the compiled uvu suites (dist/test/**) one file at a time so that one
// crashing suite cannot hide the others, then prints `N passed, N failed`.
// The end-to-end suites run once per QEMU generation installed: the system's
// qemu-system-x86_64 (Debian 12: 7.2) and QEMU 10.0 when scripts/install-qemu.sh
// --qemu10 put it in /opt/qemu-10.0 or ~/.local/qemu-10.0 (or QEMU_SNAP_QEMU10
// names its qemu-system-x86_64 wrapper). QEMU_SNAP_QEMU pins one binary.
// Usage: node scripts/run-tests.mjs [unit|e2e] [filter]
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, relative } from 'node:path';

const kind = process.argv[2];
const filter = process.argv[3];
const root = new URL('../dist/test/', import.meta.url).pathname;

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

/** The QEMU generations to run the e2e suites on: [{ label, env }]. */
function qemus() {
  if (process.env.QEMU_SNAP_QEMU) return [{ label: process.env.QEMU_SNAP_QEMU, env: {} }];
  const out = [{ label: 'system QEMU', env: {} }];
  const q10 = [process.env.QEMU_SNAP_QEMU10, '/opt/qemu-10.0/bin/qemu-system-x86_64', join(homedir(), '.local/qemu-10.0/bin/qemu-system-x86_64')]
    .find((p) => p && existsSync(p));
  if (q10) {
    const v = spawnSync(q10, ['--version'], { encoding: 'utf8' });
    const label = (/version (\S+)/.exec(v.stdout ?? '') ?? [])[1];
    if (v.status === 0 && label) out.push({ label: `QEMU ${label}`, env: { QEMU_SNAP_QEMU: q10, QEMU_SNAP_QEMU_IMG: join(dirname(q10), 'qemu-img') } });
  }
  if (out.length > 1) {
    const v = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
    const label = (/version (\S+)/.exec(v.stdout ?? '') ?? [])[1];
    if (label) out[0].label = `QEMU ${label}`;
  }
  return out;
}

const runs = [];
if (!kind || kind === 'unit') runs.push({ dir: join(root, 'unit'), label: '', env: {} });
if (!kind || kind === 'e2e') {
  const list = qemus();
  for (const q of list) runs.push({ dir: join(root, 'e2e'), label: list.length > 1 ? ` [${q.label}]` : '', env: q.env });
}

let passed = 0;
let failed = 0;
const failedFiles = [];
for (const run of runs) {
  for (const file of walk(run.dir)) {
    if (filter && !file.includes(filter)) continue;
    const rel = relative(root, file) + run.label;
    process.stdout.write(`\n# ${rel}\n`);
    const r = spawnSync(process.execPath, [file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...run.env, FORCE_COLOR: '0' } });
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
}
if (failedFiles.length) process.stdout.write(`\nfailing suites: ${failedFiles.join(', ')}\n`);
process.stdout.write(`\n${passed} passed, ${failed} failed\n`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
