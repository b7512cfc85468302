import { Token } from './constants';
import { StreamFormatError } from './errors';
import type { ChunkQueue } from './chunk-queue';
import type { RecordSink } from './records';

const MAX_VMDESC_LENGTH = 64 * 1024 * 1024;

const enum Tail {
  No,
  Partial,
  Complete,
}

/**
 * The stream from the first device SECTION_FULL on: opaque device state,
 * then the last section footer, EOF and an optional VMDESCRIPTION. Device
 * sections carry no length, so the tail is found from the end, holding back
 * only the bytes that could still belong to it.
 */
export class DeviceTail {
  /** Relative position of the earliest tail candidate not yet ruled out. */
  private scan = 0;

  constructor(
    private readonly q: ChunkQueue,
    private readonly out: RecordSink,
  ) {}

  /** The device state begins (again) at the read position. */
  restart(): void {
    this.scan = 0;
  }

  private fail(offset: number, what: string, section?: string): never {
    throw new StreamFormatError(offset, what, section);
  }

  /** After an EOF read in order: the VMDESCRIPTION, if any. True once it is complete. */
  parseAfterEof(): boolean {
    const q = this.q;
    if (q.available < 1) return false;
    const offset = q.consumed;
    const token = q.byteAt(0);
    if (token !== Token.VMDESCRIPTION) this.fail(offset, `unexpected token 0x${token.toString(16)} after EOF`);
    if (q.available < 5) return false;
    const len = q.u32At(1);
    if (len > MAX_VMDESC_LENGTH) this.fail(offset, `absurd VMDESCRIPTION length ${len}`);
    if (q.available < 5 + len) return false;
    q.skip(5);
    this.pushVmDescription(offset, q.take(len));
    return true;
  }

  private pushVmDescription(offset: number, raw: Buffer): void {
    let json: unknown;
    try {
      json = JSON.parse(raw.toString('utf8'));
    } catch {
      this.fail(offset, 'VMDESCRIPTION is not valid JSON');
    }
    this.out.push({ type: 'vmdescription', offset, json, raw: Buffer.from(raw) });
  }

  /** Classifies a possible tail (footer, EOF, optional VMDESCRIPTION) starting at relative position p. */
  private tailAt(p: number): Tail {
    const q = this.q;
    const end = q.available;
    if (q.byteAt(p) !== Token.SECTION_FOOTER) return Tail.No;
    if (p + 5 >= end) return Tail.Partial;
    if (q.byteAt(p + 5) !== Token.EOF) return Tail.No;
    if (p + 6 === end) return Tail.Complete;
    if (q.byteAt(p + 6) !== Token.VMDESCRIPTION) return Tail.No;
    if (p + 11 > end) return Tail.Partial;
    const len = q.u32At(p + 7);
    if (len === 0 || len > MAX_VMDESC_LENGTH || p + 11 + len < end) return Tail.No;
    if (p + 11 < end && q.byteAt(p + 11) !== 0x7b) return Tail.No;
    return p + 11 + len === end ? Tail.Complete : Tail.Partial;
  }

  /** Emits device state up to the earliest position that could still start the tail. */
  advance(): void {
    const q = this.q;
    let scan = this.scan;
    for (;;) {
      const at = q.indexOf(Token.SECTION_FOOTER, scan);
      if (at < 0) { scan = q.available; break; }
      // A ruled-out candidate stays ruled out: more data never revives it.
      if (this.tailAt(at) === Tail.No) { scan = at + 1; continue; }
      scan = at;
      break;
    }
    this.emitDevice(scan);
    this.scan = 0;
  }

  private emitDevice(n: number): void {
    const q = this.q;
    while (n > 0) {
      const offset = q.consumed;
      const data = q.headView(n);
      q.skip(data.length);
      n -= data.length;
      this.out.push({ type: 'device-state', offset, data });
    }
  }

  /** Relative position of a complete tail that ends the bytes received, or -1. */
  findComplete(): number {
    const q = this.q;
    let scan = this.scan;
    for (;;) {
      const at = q.indexOf(Token.SECTION_FOOTER, scan);
      if (at < 0) return -1;
      if (this.tailAt(at) === Tail.Complete) return at;
      scan = at + 1;
    }
  }

  /**
   * Relative position of a complete tail with a VMDESCRIPTION that ends at
   * the last byte received, looked for in the last `window` bytes only; -1
   * if none. Cheap enough to ask after every chunk, even over megabytes of
   * held-back tail look-alikes: nothing unless the last byte closes a JSON
   * object, then one bounded scan back from the end.
   */
  findDescribedTail(window: number): number {
    const q = this.q;
    const end = q.available;
    // The shortest: footer, section id, EOF, VMDESCRIPTION, be32 length, "{}".
    if (end < 13 || q.byteAt(end - 1) !== 0x7d) return -1;
    for (let p = end - 13; p >= 0 && p >= end - window; p--) {
      if (q.byteAt(p) === Token.SECTION_FOOTER && q.byteAt(p + 6) === Token.VMDESCRIPTION && this.tailAt(p) === Tail.Complete) return p;
    }
    return -1;
  }

  /**
   * Whether the complete tail at p carries a VMDESCRIPTION that is QEMU's
   * own: a JSON object with a numeric page_size and a devices array
   * (savevm.c writes exactly that). Device state that merely looks like a
   * tail where the bytes received so far happen to end does not pass this.
   */
  describesQemu(p: number): boolean {
    const q = this.q;
    if (q.available <= p + 11) return false;
    const len = q.u32At(p + 7);
    let json: unknown;
    try {
      json = JSON.parse(q.copyAt(p + 11, len).toString('utf8'));
    } catch {
      return false;
    }
    if (typeof json !== 'object' || json === null) return false;
    const d = json as { page_size?: unknown; devices?: unknown };
    return typeof d.page_size === 'number' && Array.isArray(d.devices);
  }

  /** Emits the device state before the complete tail at p, then EOF and the VMDESCRIPTION. */
  emitTail(p: number): void {
    const q = this.q;
    this.emitDevice(p + 5);
    this.out.push({ type: 'eof', offset: q.consumed });
    q.skip(1);
    if (q.available > 0) {
      const offset = q.consumed;
      const len = q.u32At(1);
      q.skip(5);
      this.pushVmDescription(offset, q.take(len));
    }
  }
}
