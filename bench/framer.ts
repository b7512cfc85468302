// Framer throughput against a `cat | cat` pipe, on a real QEMU stream from a
// 2 GiB VM holding 1 GiB of random data. Usage:
//   node dist/bench/framer.js [--keep STREAM] [--stream EXISTING] [--runs 3]
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as crypto from 'crypto';
import { spawnSync } from 'child_process';
import { Writable } from 'streamx';
import { MigrationFramer } from '../src/migration/framer';
import type { MigrationRecord } from '../src/migration/records';
import { captureQemuStream, haveQemu } from '../test/unit/synthetic-stream';

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function writeRandomFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w');
  const chunk = 16 * 1024 * 1024;
  for (let done = 0; done < bytes; done += chunk) fs.writeSync(fd, crypto.randomBytes(Math.min(chunk, bytes - done)));
  fs.closeSync(fd);
}

function timeCatPipe(file: string): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('sh', ['-c', `cat "${file}" | cat > /dev/null`], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error('cat pipeline failed');
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function timeFramer(file: string): Promise<{ seconds: number; records: number; pages: number }> {
  const t0 = process.hrtime.bigint();
  let records = 0;
  let pages = 0;
  await new Promise<void>((resolve, reject) => {
    const framer = new MigrationFramer();
    const sink = new Writable({
      highWaterMark: 4 * 1024 * 1024,
      write(r: unknown, cb: (err: Error | null) => void) {
        records++;
        if ((r as MigrationRecord).type === 'ram-page') pages++;
        cb(null);
      },
    });
    const src = fs.createReadStream(file, { highWaterMark: 1024 * 1024 });
    src.on('error', reject);
    framer.on('error', reject);
    sink.on('error', reject);
    sink.on('finish', () => resolve());
    src.pipe(framer as unknown as NodeJS.WritableStream);
    framer.pipe(sink);
  });
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, records, pages };
}

async function main(): Promise<void> {
  const runs = Number(arg('--runs') ?? 3);
  let stream = arg('--stream');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsnap-bench-'));
  try {
    if (!stream) {
      if (!haveQemu()) throw new Error('qemu-system-x86_64 is missing');
      const pattern = path.join(dir, 'pattern.bin');
      writeRandomFile(pattern, 1024 * 1024 * 1024);
      stream = arg('--keep') ?? path.join(dir, 'vm.stream');
      const stats = await captureQemuStream(stream, { memMiB: 2048, patternFile: pattern });
      fs.rmSync(pattern);
      console.log(`captured ${stream}: ${fs.statSync(stream).size} bytes in ${stats.seconds.toFixed(2)} s (normal ${stats.normal}, duplicate ${stats.duplicate})`);
    }
    const size = fs.statSync(stream).size;
    const mbps = (s: number) => (size / 1e6 / s).toFixed(0);
    let bestCat = Infinity;
    let bestFramer = Infinity;
    let info = { records: 0, pages: 0 };
    for (let i = 0; i < runs; i++) {
      const c = timeCatPipe(stream);
      const f = await timeFramer(stream);
      bestCat = Math.min(bestCat, c);
      bestFramer = Math.min(bestFramer, f.seconds);
      info = f;
      console.log(`run ${i + 1}: cat|cat ${c.toFixed(3)} s (${mbps(c)} MB/s), framer ${f.seconds.toFixed(3)} s (${mbps(f.seconds)} MB/s)`);
    }
    console.log(`stream ${size} bytes, ${info.records} records, ${info.pages} data pages`);
    console.log(`best of ${runs}: cat|cat ${mbps(bestCat)} MB/s, framer ${mbps(bestFramer)} MB/s, ratio ${(bestCat / bestFramer).toFixed(2)} (target >= 0.8)`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
