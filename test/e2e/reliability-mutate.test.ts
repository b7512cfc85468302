// Mutation tests over a real QEMU stream and the image saved from it (the
// same engine as bench/mutate.ts, fewer cases): every damaged input must end
// in exit 0 with a sound result or a clean one-line exit 1, with no file left
// behind by save and nothing on stdout when load could tell before streaming.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { requireQemu } from './lib';
import { tempDir } from './common';
import { captureStream, mapStream, mapImage, saveCase, loadCase, runCliCase, pool, tally, formatTally, CaseOutcome } from '../../bench/mutate';

const SEED = Number(process.env.QEMU_SNAP_MUTATE_SEED ?? 424242);
const SAVE_CASES = 100;
const LOAD_CASES = 80;
const JOBS = Math.max(1, Math.min(2, os.cpus().length));
const dir = tempDir('mutate');
const streamFile = path.join(dir, 'vm.stream');

test.before(async () => {
  requireQemu();
  await captureStream(streamFile, 64, 2, 9);
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function report(title: string, outcomes: CaseOutcome[]): void {
  const t = tally(outcomes);
  process.stdout.write(`${formatTally(title, t)}\n`);
  const lines = t.failures.slice(0, 5).map((f) => `${f.kind}/${f.op} ${f.desc}: ${f.why} [${f.stderr}]`);
  assert.is(t.failures.length, 0, `${t.failures.length} failing cases:\n${lines.join('\n')}`);
  // Both outcomes must occur: a suite where nothing is refused tests nothing.
  assert.ok(outcomes.some((o) => o.result === 'refused') && outcomes.some((o) => o.result === 'ok'));
}

test(`save: ${SAVE_CASES} damaged real streams (seed ${SEED})`, async () => {
  const stream = fs.readFileSync(streamFile);
  const regions = await mapStream(stream);
  const outcomes = await pool(SAVE_CASES, JOBS, (i) => saveCase(stream, regions, SEED + i, { workDir: dir, check: i % 20 === 0 }));
  report('save', outcomes);
});

test(`load: ${LOAD_CASES} damaged images (seed ${SEED})`, async () => {
  const image = path.join(dir, 'base.qcow2');
  const s = await runCliCase(['save', '-q', '--input', streamFile, image], { timeoutMs: 60_000 });
  assert.is(s.code, 0, s.stderr);
  const baseline = await runCliCase(['load', '-q', image], { timeoutMs: 60_000 });
  assert.is(baseline.code, 0, baseline.stderr);
  const base = fs.readFileSync(image);
  const regions = mapImage(base);
  const outcomes = await pool(LOAD_CASES, JOBS, (i) => loadCase(base, regions, SEED + 7919 * i, { workDir: dir, baseline: baseline.stdout }));
  report('load', outcomes);
  // The oracle itself: with the digest check off (--no-verify), flipped
  // page data goes out and exits 0; a strict oracle must call that a failure.
  const unchecked = await pool(12, JOBS, (i) =>
    loadCase(base, regions, SEED + 104729 * i, { workDir: dir, baseline: baseline.stdout, loadArgs: ['--no-verify'], weights: { data: 1 } }),
  );
  assert.ok(
    unchecked.some((o) => o.result === 'fail' && /differs from the undamaged/.test(o.why ?? '')),
    `no --no-verify data case was caught: ${unchecked.map((o) => `${o.result} ${o.desc}`).join('; ')}`,
  );
});

test.run();
