// Small helpers shared by tests and benchmarks.

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
