// Save side of the RAM digests: decides when a chunk of the virtual disk has
// its final content and has it digested then, while the stream still flows.
//
// A source sends RAM in passes over ascending addresses, so once the writes
// have moved past a chunk and none of its writes is in flight, the chunk is
// read back (page cache) and digested by the worker. A chunk written again
// after that (a live VM re-sends pages) is marked dirty and digested once
// more at the end, when nothing can change it any longer.
import { ChunkDigester, DIGEST_CHUNK_SIZE, zeroChunkCrc } from './digests';

interface ChunkSource {
  read(offset: number, length: number): Promise<Buffer>;
}

const UNTOUCHED = 0;
const OPEN = 1;
const SCHEDULED = 2;
const DIRTY = 3;
const MAX_DIGESTS_IN_FLIGHT = 4;

export class ChunkTracker {
  private readonly state: Uint8Array;
  private readonly inFlight: Uint16Array;
  readonly table: Uint32Array;
  /** Chunks in the order they were first written, not yet scheduled. */
  private queue: number[] = [];
  private head = 0;
  private lastFirst = -1;
  private lastEnd = -1;
  private digesting = 0;
  private error: Error | null = null;
  private idle: (() => void) | null = null;
  private readonly chunkSize = DIGEST_CHUNK_SIZE;

  constructor(
    private readonly source: ChunkSource,
    private readonly virtualSize: number,
    private readonly digester: ChunkDigester,
  ) {
    const n = Math.ceil(virtualSize / this.chunkSize);
    this.state = new Uint8Array(n);
    this.inFlight = new Uint16Array(n);
    this.table = new Uint32Array(n);
  }

  writeStarted(offset: number, length: number): void {
    const first = Math.floor(offset / this.chunkSize);
    const end = Math.ceil((offset + length) / this.chunkSize);
    for (let c = first; c < end; c++) {
      this.inFlight[c]++;
      const st = this.state[c];
      if (st === UNTOUCHED) {
        this.state[c] = OPEN;
        this.queue.push(c);
      } else if (st === SCHEDULED) {
        this.state[c] = DIRTY;
      }
    }
    this.lastFirst = first;
    this.lastEnd = end;
    this.pump();
  }

  writeDone(offset: number, length: number): void {
    const first = Math.floor(offset / this.chunkSize);
    const end = Math.ceil((offset + length) / this.chunkSize);
    for (let c = first; c < end; c++) this.inFlight[c]--;
    this.pump();
  }

  /** After the last write completed: digests what is left and returns the table. */
  async finish(): Promise<Uint32Array> {
    this.lastFirst = this.lastEnd = -1;
    this.pump(true);
    await this.drain();
    const again: number[] = [];
    for (let c = 0; c < this.state.length; c++) {
      if (this.state[c] === DIRTY) again.push(c);
      else if (this.state[c] === UNTOUCHED) this.table[c] = zeroChunkCrc(this.chunkLength(c));
    }
    for (const c of again) {
      this.state[c] = OPEN;
      this.queue.push(c);
    }
    this.pump(true);
    await this.drain();
    return this.table;
  }

  private chunkLength(c: number): number {
    return Math.min(this.chunkSize, this.virtualSize - c * this.chunkSize);
  }

  private pump(all = false): void {
    while (this.head < this.queue.length && this.digesting < MAX_DIGESTS_IN_FLIGHT && !this.error) {
      const c = this.queue[this.head];
      if (!all && c >= this.lastFirst && c < this.lastEnd) break; // still being written
      if (this.inFlight[c] > 0) break;
      this.head++;
      if (this.state[c] !== OPEN) continue;
      this.state[c] = SCHEDULED;
      this.digesting++;
      this.source
        .read(c * this.chunkSize, this.chunkLength(c))
        .then((buf) => this.digester.digest(buf))
        .then(
          (d) => {
            if (this.state[c] === SCHEDULED) this.table[c] = d.crc;
          },
          (err: Error) => {
            this.error ??= err;
          },
        )
        .finally(() => {
          this.digesting--;
          this.pump(this.idle !== null);
          if (this.digesting === 0 && this.idle) this.idle();
        });
    }
    if (this.head > 4096 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
  }

  private async drain(): Promise<void> {
    while (this.digesting > 0 || (this.head < this.queue.length && !this.error)) {
      await new Promise<void>((resolve) => {
        this.idle = resolve;
        this.pump(true);
        if (this.digesting === 0) resolve();
      });
      this.idle = null;
    }
    if (this.error) throw this.error;
  }
}
