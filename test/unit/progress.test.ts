// Progress (issue 17): RAM covered out of RAM in all, page counts kept
// apart, an ETA, and plain lines without control characters when stderr
// is not a terminal.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { ProgressLine, ProgressMode, ProgressState } from '../../src/util/progress';
import { saveProgress, loadProgress } from '../../src/snapshot/progress-state';
import { saveSnapshot } from '../../src/snapshot/save';
import { loadSnapshot } from '../../src/snapshot/load';
import { completeStream, BLOCKS } from './synthetic-stream';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-progress-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function collect(mode: ProgressMode, everyMs = 0): { line: ProgressLine; text: () => string } {
  const chunks: string[] = [];
  const out = { write: (s: string) => chunks.push(s) } as unknown as NodeJS.WritableStream;
  return { line: new ProgressLine('save', mode, out, { everyMs }), text: () => chunks.join('') };
}

const HALF: ProgressState = { covered: 1 << 30, total: 2 * 2 ** 30, moved: 1 << 30, stage: 'first pass', detail: '262144 data pages, 0 zero, 0 re-sent' };

test('lines mode: whole lines, no carriage return or escape, a final line', () => {
  const { line, text } = collect('lines');
  line.update(HALF);
  line.done({ ...HALF, covered: 2 * 2 ** 30, stage: undefined });
  const lines = text().split('\n');
  assert.is(lines.length, 3, text());
  assert.is(lines[2], '');
  for (const l of lines) assert.ok(/^[\x20-\x7e]*$/.test(l), `only printable characters: ${JSON.stringify(l)}`);
  assert.match(lines[0], /^save: 1\.0 GiB of 2\.0 GiB RAM \(50%\), first pass, 262144 data pages, 0 zero, 0 re-sent, .*\/s, ETA /);
  assert.match(lines[1], /^save: 2\.0 GiB of 2\.0 GiB RAM \(100%\), 262144 data pages.* in \d+\.\d s$/);
});

test('lines mode writes at most one line per interval', () => {
  const { line, text } = collect('lines', 60_000);
  for (let i = 0; i < 100; i++) line.update(HALF);
  assert.is(text(), '', 'nothing before the first interval has passed');
});

test('tty mode rewrites one line; off writes nothing', () => {
  const tty = collect('tty');
  tty.line.update(HALF);
  tty.line.clear();
  assert.match(tty.text(), /^\rsave: .*\x1b\[K\n$/);
  const off = collect('off');
  off.line.update(HALF);
  off.line.done(HALF);
  assert.is(off.text(), '');
});

test('ETA follows the fraction done; none while a live VM re-sends', () => {
  const { line } = collect('lines');
  const started = Date.now();
  const at = (state: ProgressState, secs: number) => line.format(state, started + secs * 1000, false);
  assert.match(at(HALF, 10), /ETA 10 s$/);
  assert.match(at({ ...HALF, fraction: 0.25 }, 10), /ETA 30 s$/);
  assert.match(at({ ...HALF, fraction: null }, 10), /ETA \?$/);
});

test('save: covered pages, data, zero and re-sent kept apart (synthetic stream with re-sends)', async () => {
  const image = path.join(dir, 'resend.qcow2');
  const r = await saveSnapshot(Readable.from([completeStream()]), image, { clusterSize: 64 << 10 });
  // completeStream: pc.ram 0, 4096, 8192 (zero), 12288 and the ROM's pages 0 and 4096 (zero, by
  // CONTINUE after the ROM) once each; pc.ram 4096 once more at the end.
  assert.is(r.totalPages, BLOCKS.reduce((n, b) => n + b.length / 4096, 0));
  assert.is(r.coveredPages, 6);
  const s = saveProgress(r.streamBytes, r);
  assert.is(s.covered, 6 * 4096);
  assert.is(s.total, r.totalPages * 4096);
  assert.is(s.stage, 're-sending dirtied pages');
  assert.is(s.fraction, null);
  assert.is(s.detail, '4 data pages, 2 zero, 1 re-sent');

  const out = path.join(dir, 'resend.stream');
  const seen: number[] = [];
  const l = await loadSnapshot(image, { output: out, onProgress: (_b, _p, state) => seen.push(state.dataPagesSent) });
  const ls = loadProgress(l.streamBytes, l);
  assert.is(ls.total, r.totalPages * 4096);
  assert.is(ls.covered, ls.total, 'a load covers every page once');
  // Pages 0 of both blocks hold zeros as data: load sends them as ZERO records.
  assert.is(l.dataPagesSent + l.zeroPagesSent, r.totalPages);
  assert.is(ls.detail, `2 of 4 data pages, ${r.totalPages - 2} zero`);
  assert.ok(seen.every((n) => n <= 2));
});

test.run();
