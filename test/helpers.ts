// Small helpers shared by tests and benchmarks.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';

/** mulberry32: a small seeded PRNG, so that random tests and mutation runs reproduce from their seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const sleep = (ms: number): Promise<void> => new Promise<void>((r) => setTimeout(r, ms));
/** One turn of the event loop. */
export const tick = (): Promise<void> => new Promise<void>((r) => setImmediate(r));

let fifos = 0;

/**
 * A pipe(2)-like pair from a FIFO made in `dir`, both ends in blocking mode:
 * [read fd, write fd]. Node has no pipe(2), and spawn's 'pipe' stdio gives
 * socketpairs. Opening O_RDWR first lets the two one-way opens proceed
 * without a second process; it is closed again so that closing the write
 * end gives the reader EOF.
 */
export function fifoPair(dir: string): [number, number] {
  const f = path.join(dir, `fifo${process.pid}-${fifos++}`);
  if (spawnSync('mkfifo', [f]).status !== 0) throw new Error(`mkfifo ${f} failed`);
  const both = fs.openSync(f, fs.constants.O_RDWR);
  const r = fs.openSync(f, fs.constants.O_RDONLY);
  const w = fs.openSync(f, fs.constants.O_WRONLY);
  fs.closeSync(both);
  fs.rmSync(f);
  return [r, w];
}
