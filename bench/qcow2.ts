/**
 * QCOW2 engine throughput against plain positional fs I/O on the same data.
 * Writes 1 GiB of random data in 1 MiB pieces (4 and 1 in flight) into a new
 * image and into a plain file, then reads both back the same way. The page
 * cache is not dropped: both sides see the same conditions, compared in one run.
 *
 *   node dist/bench/qcow2.js [--size-mib 1024] [--dir /tmp]
 */
import { randomFillSync } from 'crypto';
import { existsSync, mkdtempSync, rmSync } from 'fs';
import { open } from 'fs/promises';
import { tmpdir } from 'os';
import { join } from 'path';
import { Qcow2Image } from '../src/image';

const MIB = 1024 * 1024;
const PIECE = MIB;

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

const totalMiB = Number(arg('--size-mib', '1024'));
const dir = mkdtempSync(join(arg('--dir', tmpdir()), 'qcow2-bench-'));
// A 64 MiB random pool, sliced: the same bytes go to both targets without per-piece allocation.
const pool = randomFillSync(Buffer.allocUnsafe(64 * MIB));
const pieces = totalMiB;

function piece(i: number): Buffer {
  const at = (i * PIECE) % pool.length;
  return pool.subarray(at, at + PIECE);
}

/** Run op(i) for i in [0, n) with at most `depth` in flight, in submission order. */
async function pipeline(n: number, depth: number, op: (i: number) => Promise<unknown>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < n) await op(next++);
  };
  await Promise.all(Array.from({ length: depth }, worker));
}

async function timed(fn: () => Promise<void>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function plainWrite(path: string, depth: number): Promise<number> {
  return timed(async () => {
    const fh = await open(path, 'w');
    await pipeline(pieces, depth, (i) => fh.write(piece(i), 0, PIECE, i * PIECE));
    await fh.close();
  });
}

async function plainRead(path: string, depth: number): Promise<number> {
  return timed(async () => {
    const fh = await open(path, 'r');
    await pipeline(pieces, depth, (i) => fh.read(Buffer.allocUnsafe(PIECE), 0, PIECE, i * PIECE));
    await fh.close();
  });
}

async function qcowWrite(path: string, depth: number): Promise<number> {
  return timed(async () => {
    const img = await Qcow2Image.create(path, { virtualSize: pieces * PIECE });
    await pipeline(pieces, depth, (i) => img.write(i * PIECE, piece(i)));
    await img.close();
  });
}

async function qcowRead(path: string, depth: number): Promise<number> {
  return timed(async () => {
    const img = await Qcow2Image.open(path);
    await pipeline(pieces, depth, (i) => img.read(i * PIECE, PIECE));
    await img.close();
  });
}

async function verify(path: string): Promise<void> {
  const img = await Qcow2Image.open(path);
  for (const i of [0, pieces >> 1, pieces - 1]) {
    if (!(await img.read(i * PIECE, PIECE)).equals(piece(i))) throw new Error(`bench: piece ${i} reads back wrong`);
  }
  await img.close();
}

const mbs = (secs: number): string => ((pieces * PIECE) / 1e6 / secs).toFixed(0).padStart(6);

async function main(): Promise<void> {
  console.log(`qcow2 bench: ${totalMiB} MiB in 1 MiB pieces, cluster 1 MiB, dir ${dir}`);
  const rows: string[] = [];
  for (const depth of [4, 1]) {
    const plain = join(dir, `plain-${depth}.raw`);
    const image = join(dir, `image-${depth}.qcow2`);
    // Best of 3 rounds, alternating which side goes first: this shared machine varies 2x between runs.
    // Before each write the other side's file is deleted (dropping its dirty pages unwritten),
    // so that neither side pays for the other's writeback throttling.
    let pw = Infinity;
    let qw = Infinity;
    let pr = Infinity;
    let qr = Infinity;
    const measurePlain = async (): Promise<void> => {
      rmSync(image, { force: true });
      pw = Math.min(pw, await plainWrite(plain, depth));
    };
    const measureQcow = async (): Promise<void> => {
      rmSync(plain, { force: true });
      qw = Math.min(qw, await qcowWrite(image, depth));
    };
    for (let round = 0; round < 3; round++) {
      if (round % 2 === 0) {
        await measurePlain();
        await measureQcow();
      } else {
        await measureQcow();
        await measurePlain();
      }
    }
    // The reads need both files; the last round deleted one of them.
    if (!existsSync(plain)) await plainWrite(plain, depth);
    if (!existsSync(image)) await qcowWrite(image, depth);
    await verify(image);
    for (let round = 0; round < 3; round++) {
      if (round % 2 === 0) {
        pr = Math.min(pr, await plainRead(plain, depth));
        qr = Math.min(qr, await qcowRead(image, depth));
      } else {
        qr = Math.min(qr, await qcowRead(image, depth));
        pr = Math.min(pr, await plainRead(plain, depth));
      }
    }
    rows.push(`write depth ${depth}: plain ${mbs(pw)} MB/s  qcow2 ${mbs(qw)} MB/s  qcow2/plain ${(pw / qw).toFixed(2)}`);
    rows.push(`read  depth ${depth}: plain ${mbs(pr)} MB/s  qcow2 ${mbs(qr)} MB/s  qcow2/plain ${(pr / qr).toFixed(2)}`);
    console.log(rows.slice(-2).join('\n'));
    rmSync(plain);
    rmSync(image);
  }
}

main()
  .catch((err) => {
    console.error(err);
    process.exitCode = 1;
  })
  .finally(() => rmSync(dir, { recursive: true, force: true }));
