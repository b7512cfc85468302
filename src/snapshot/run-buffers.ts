// Reusable buffers for coalesced page runs.
//
// A fresh 1 MiB Buffer costs 256 page faults the first time it is filled;
// at 1 GiB per save that was 0.15-0.2 s of system time. Buffers go back to
// the pool when their write completed and are handed out again.
import { native } from '../util/native';

/** The bytes `count` segments describe, in order, copied to `into` from its start (natively when the module can). */
export function copySegmentsInto(into: Buffer, buffers: Buffer[], segments: Float64Array, count: number): number {
  const copy = native()?.copySegments;
  if (copy !== undefined) return copy(into, buffers, segments, count);
  let at = 0;
  for (let i = 0; i < count * 3; i += 3) at += buffers[segments[i]].copy(into, at, segments[i + 1], segments[i + 1] + segments[i + 2]);
  return at;
}

export class RunBufferPool {
  private readonly free: Buffer[] = [];
  /** Buffers handed out and not yet given back (weak: one never given back is simply collected). */
  private readonly lent = new WeakSet<ArrayBufferLike>();

  /**
   * `size` bytes per buffer; at most `keep` idle buffers are kept.
   * `allocate` makes a fresh one (aligned memory for O_DIRECT, say).
   */
  constructor(
    readonly size: number,
    private readonly keep = 64,
    private readonly allocate: (size: number) => Buffer = Buffer.allocUnsafeSlow,
  ) {}

  take(): Buffer {
    const b = this.free.pop() ?? this.allocate(this.size);
    this.lent.add(b.buffer);
    return b;
  }

  /** Gives back the buffer behind `view` (a view of a lent buffer); anything else, or a second release, is ignored. */
  release(view: Buffer): void {
    if (!this.lent.has(view.buffer)) return;
    this.lent.delete(view.buffer);
    if (this.free.length < this.keep) this.free.push(Buffer.from(view.buffer, 0, this.size));
  }
}
