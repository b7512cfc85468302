import { Transform } from 'streamx';
import { QemuSnapError } from '../errors';
import {
  Command,
  DEFAULT_PAGE_SIZE,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_FILE_VERSION_COMPAT,
  RamFlag,
  Token,
} from './constants';
import { StreamFormatError } from './errors';
import { ENCODING_FLAG_XBZRLE } from './xbzrle';
import { printable } from '../util/text';
import type {
  ConfigurationSubsection,
  FramedRecord,
  MigrationRecord,
  RamBlockInfo,
} from './records';

const EMPTY = Buffer.alloc(0);
const TWO32 = 4294967296;
/** QEMU's `ram` section version (register_savevm_live("ram", 0, 4, ...)). */
const RAM_SECTION_VERSION = 4;
const MAX_RAM_TOTAL = 16 * 1024 ** 4;
const MAX_RAM_BLOCKS = 1000;
const MAX_VMDESC_LENGTH = 64 * 1024 * 1024;
const MAX_MACHINE_NAME = 256;
const MAX_CAPABILITIES = 256;
/** Most records in one page run. */
const PAGE_RUN_MAX = 1024;
const KNOWN_RAM_FLAGS =
  RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE |
  RamFlag.XBZRLE | RamFlag.HOOK | RamFlag.COMPRESS_PAGE | RamFlag.MULTIFD_FLUSH;

/** What turned on the iterable sections other than ram that QEMU 7.2 and 10.0 may send. */
const ITERABLE_SECTION_CAPABILITY = new Map<string, string>([
  ['block', 'block migration (the block capability, or migrate -b/-i) copies disks; save the disks apart'],
  ['dirty-bitmaps', 'turn the dirty-bitmaps capability off'],
]);

/** Payload length of each command, -1 when variable (mig_cmd_args in savevm.c). */
const COMMAND_ARGS = new Map<number, { name: string; len: number }>([
  [Command.OPEN_RETURN_PATH, { name: 'OPEN_RETURN_PATH', len: 0 }],
  [Command.PING, { name: 'PING', len: 4 }],
  [Command.POSTCOPY_ADVISE, { name: 'POSTCOPY_ADVISE', len: -1 }],
  [Command.POSTCOPY_LISTEN, { name: 'POSTCOPY_LISTEN', len: 0 }],
  [Command.POSTCOPY_RUN, { name: 'POSTCOPY_RUN', len: 0 }],
  [Command.POSTCOPY_RAM_DISCARD, { name: 'POSTCOPY_RAM_DISCARD', len: -1 }],
  [Command.PACKAGED, { name: 'PACKAGED', len: 4 }],
  [Command.ENABLE_COLO, { name: 'ENABLE_COLO', len: 0 }],
  [Command.POSTCOPY_RESUME, { name: 'POSTCOPY_RESUME', len: 0 }],
  [Command.RECV_BITMAP, { name: 'RECV_BITMAP', len: -1 }],
  [Command.SWITCHOVER_START, { name: 'SWITCHOVER_START', len: 0 }],
]);

export function commandName(command: number): string {
  return COMMAND_ARGS.get(command)?.name ?? `UNKNOWN(${command})`;
}

export function isValidPageSize(n: number): boolean {
  return Number.isInteger(n) && n >= 512 && n <= 65536 && (n & (n - 1)) === 0;
}

/**
 * Pending input: a list of chunks and a read position. Reads that fit in the
 * head chunk are views into it; only fields that straddle chunks are copied.
 */
class ChunkQueue {
  private chunks: Buffer[] = [];
  private head: Buffer = EMPTY;
  private pos = 0;
  /** locate()'s cursor: a chunk index and the queue position where that chunk starts. */
  private cursorChunk = 0;
  private cursorBase = 0;
  /** Bytes not yet consumed. */
  available = 0;
  /** Absolute stream offset of the next unconsumed byte. */
  consumed = 0;

  /** The chunk holding the read position, and where in it that is. */
  get headChunk(): Buffer {
    return this.head;
  }

  get headPos(): number {
    return this.pos;
  }

  push(chunk: Buffer): void {
    if (this.chunks.length === 0) {
      this.head = chunk;
      this.pos = 0;
    }
    this.chunks.push(chunk);
    this.available += chunk.length;
  }

  byteAt(rel: number): number {
    const i = this.pos + rel;
    const head = this.head;
    if (i < head.length) return head[i];
    const k = this.locate(i);
    if (k >= this.chunks.length) throw new RangeError('ChunkQueue.byteAt past the end');
    return this.chunks[k][i - this.cursorBase];
  }

  /**
   * Index of the chunk holding queue position i (pos + rel), found from a
   * cursor: the device-state tail search probes candidates front to back
   * over up to 64 MiB held back in many chunks, and walking from the first
   * chunk for each probe made it quadratic (a minute for 48 MiB).
   */
  private locate(i: number): number {
    let k = this.cursorChunk;
    let base = this.cursorBase;
    if (i < base) {
      if (k > 0 && i >= base - this.chunks[k - 1].length) {
        k--;
        base -= this.chunks[k].length;
      } else {
        k = 0;
        base = 0;
      }
    }
    while (k < this.chunks.length && i >= base + this.chunks[k].length) {
      base += this.chunks[k].length;
      k++;
    }
    this.cursorChunk = k;
    this.cursorBase = base;
    return k;
  }

  u16At(rel: number): number {
    const i = this.pos + rel;
    if (i + 2 <= this.head.length) return this.head.readUInt16BE(i);
    return (this.byteAt(rel) << 8) | this.byteAt(rel + 1);
  }

  u32At(rel: number): number {
    const i = this.pos + rel;
    if (i + 4 <= this.head.length) return this.head.readUInt32BE(i);
    return this.byteAt(rel) * 0x1000000 + ((this.byteAt(rel + 1) << 16) | (this.byteAt(rel + 2) << 8) | this.byteAt(rel + 3));
  }

  /** True when `bytes` appear at `rel`. */
  equalsAt(rel: number, bytes: Buffer): boolean {
    const i = this.pos + rel;
    if (i + bytes.length <= this.head.length) {
      return this.head.compare(bytes, 0, bytes.length, i, i + bytes.length) === 0;
    }
    for (let k = 0; k < bytes.length; k++) if (this.byteAt(rel + k) !== bytes[k]) return false;
    return true;
  }

  stringAt(rel: number, n: number): string {
    const i = this.pos + rel;
    if (i + n <= this.head.length) return this.head.toString('latin1', i, i + n);
    return this.copyAt(rel, n).toString('latin1');
  }

  copyAt(rel: number, n: number): Buffer {
    // Chunk by chunk: a page straddling two pipe reads is common (every
    // ~16th page with 64 KiB reads), and a byte loop over byteAt made it
    // the framer's hottest function.
    const out = Buffer.allocUnsafe(n);
    let skip = this.pos + rel;
    let done = 0;
    for (let k = 0; k < this.chunks.length && done < n; k++) {
      const c = this.chunks[k];
      if (skip >= c.length) {
        skip -= c.length;
        continue;
      }
      const take = Math.min(c.length - skip, n - done);
      c.copy(out, done, skip, skip + take);
      done += take;
      skip = 0;
    }
    if (done < n) throw new RangeError('ChunkQueue.copyAt past the end');
    return out;
  }

  /** Relative index of the next `byte` at or after `rel`, or -1. */
  indexOf(byte: number, rel: number): number {
    const i = this.pos + rel;
    let k = this.locate(i);
    let b = this.cursorBase;
    for (; k < this.chunks.length; k++) {
      const c = this.chunks[k];
      const at = c.indexOf(byte, Math.max(i - b, 0));
      if (at >= 0) {
        this.cursorChunk = k;
        this.cursorBase = b;
        return b + at - this.pos;
      }
      b += c.length;
    }
    return -1;
  }

  skip(n: number): void {
    this.pos += n;
    this.consumed += n;
    this.available -= n;
    while (this.pos >= this.head.length && this.chunks.length > 0) {
      this.pos -= this.head.length;
      this.chunks.shift();
      this.cursorChunk = 0;
      this.cursorBase = 0;
      this.head = this.chunks.length > 0 ? this.chunks[0] : EMPTY;
    }
  }

  /** n bytes: a view when they lie in one chunk, else a copy. */
  take(n: number): Buffer {
    const i = this.pos;
    let out: Buffer;
    if (i + n <= this.head.length) out = this.head.subarray(i, i + n);
    else out = this.copyAt(0, n);
    this.skip(n);
    return out;
  }

  /** The longest view (at most n bytes) available at the read position, without consuming. */
  headView(n: number): Buffer {
    return this.head.subarray(this.pos, Math.min(this.head.length, this.pos + n));
  }
}

const enum State {
  Header,
  Top,
  RamBody,
  Footer,
  Device,
  AfterEof,
  Done,
  Failed,
}

const enum Tail {
  No,
  Partial,
  Complete,
}

export interface MigrationFramerOptions {
  /** Target page size when the stream has no target-page-bits subsection (default 4096). */
  pageSize?: number;
  /**
   * Emit runs of PAGE/ZERO records (`ram-page-run`) instead of one record per
   * page where the records lie in one input chunk (default false).
   */
  pageRuns?: boolean;
}

function recordByteLength(data: unknown): number {
  if (Buffer.isBuffer(data)) return data.length;
  const r = data as FramedRecord;
  switch (r.type) {
    case 'ram-page':
    case 'device-state':
      return r.data.length;
    case 'ram-page-run':
      return r.byteLength;
    default:
      return 64;
  }
}

/**
 * Bytes of a QEMU migration stream (version 3) in, typed records out.
 * Everything from the first device SECTION_FULL on is passed through as
 * opaque `device-state` chunks; the EOF/VMDESCRIPTION tail is found from the
 * end, holding back only the bytes that could still belong to it.
 */
export class MigrationFramer extends Transform {
  private readonly q = new ChunkQueue();
  private state = State.Header;
  private pageSize: number;
  private mask: number;
  private ignoreShared = false;

  private ramSectionId = -1;
  private ramEnded = false;
  /** The device state followed a RAM PART without any END: a background-snapshot stream. */
  private ramEndedByDeviceState = false;
  private inRamStart = false;
  private inRamEnd = false;
  private memSizeSeen = false;
  private sawRamPart = false;
  private blocks: RamBlockInfo[] = [];
  private blockIds: Buffer[] = [];
  private lastBlock: RamBlockInfo | null = null;

  // The page run being gathered (pageRuns): records of runBlock in runSource.
  private readonly pageRuns: boolean;
  private readonly runAddresses = new Float64Array(PAGE_RUN_MAX);
  private readonly runDataAt = new Int32Array(PAGE_RUN_MAX);
  private runCount = 0;
  private runBlock: RamBlockInfo | null = null;
  private runSource: Buffer = EMPTY;
  private runOffset = 0;
  private runContinued = false;
  private runBytes = 0;

  /** Device phase: relative position of the earliest tail candidate not yet ruled out. */
  private tailScan = 0;

  constructor(opts: MigrationFramerOptions = {}) {
    super({ highWaterMark: 4 * 1024 * 1024, byteLengthReadable: recordByteLength });
    const pageSize = opts.pageSize ?? DEFAULT_PAGE_SIZE;
    if (!isValidPageSize(pageSize)) {
      throw new QemuSnapError(`invalid page size ${pageSize}: must be a power of two in 512..65536`);
    }
    this.pageSize = pageSize;
    this.mask = pageSize - 1;
    this.pageRuns = opts.pageRuns === true;
  }

  /** RAM blocks announced so far by MEM_SIZE. */
  get ramBlocks(): readonly RamBlockInfo[] {
    return this.blocks;
  }

  /**
   * True once the device state has begun straight after a RAM PART section,
   * with no SECTION_END of ram: QEMU's background-snapshot layout
   * (bg_migration_thread in migration.c writes the setup and iteration
   * sections only, then appends the device state it buffered when the
   * snapshot started).
   */
  get backgroundSnapshot(): boolean {
    return this.ramEndedByDeviceState;
  }

  /** Target page size in use (from the stream's configuration, or the option). */
  get targetPageSize(): number {
    return this.pageSize;
  }

  /** Total bytes received so far. */
  get bytesReceived(): number {
    return this.q.consumed + this.q.available;
  }

  /**
   * True when the bytes received so far end exactly with the stream's tail
   * (last footer + EOF, optionally + a complete VMDESCRIPTION), i.e. a source
   * that waits for SHUT on the return path has sent everything.
   */
  /**
   * Like tailComplete(), but says whether the complete tail carries a
   * VMDESCRIPTION. A precopy source sends EOF and VMDESCRIPTION through the
   * same buffer, but the two can arrive apart: a tail that ends at EOF is
   * only trusted after a longer silence.
   */
  completeTail(): 'none' | 'eof' | 'vmdescription' {
    if (this.state === State.Device) {
      const p = this.findCompleteTail();
      if (p < 0) return 'none';
      return this.q.available > p + 6 ? 'vmdescription' : 'eof';
    }
    return this.tailComplete() ? 'eof' : 'none';
  }

  tailComplete(): boolean {
    switch (this.state) {
      case State.Device:
        return this.findCompleteTail() >= 0;
      case State.AfterEof:
        return this.q.available === 0;
      case State.Done:
        return true;
      default:
        return false;
    }
  }

  override _transform(data: unknown, cb: (err: Error | null, mapped: unknown) => void): void {
    const chunk = data as Buffer;
    if (this.state === State.Failed || chunk.length === 0) return cb(null, null);
    this.q.push(chunk);
    try {
      this.run();
    } catch (err) {
      this.state = State.Failed;
      return cb(err as Error, null);
    }
    cb(null, null);
  }

  /** Typed push: the readable side carries MigrationRecord objects only. */
  override push(record: FramedRecord | null): boolean {
    return super.push(record);
  }

  override _flush(cb: (err: Error | null) => void): void {
    try {
      this.finish();
    } catch (err) {
      this.state = State.Failed;
      return cb(err as Error);
    }
    cb(null);
  }

  private fail(offset: number, what: string, section?: string): never {
    throw new StreamFormatError(offset, what, section);
  }

  private run(): void {
    for (;;) {
      let progressed: boolean;
      switch (this.state) {
        case State.Header: progressed = this.parseHeader(); break;
        case State.Top: progressed = this.parseTop(); break;
        case State.RamBody: progressed = this.parseRam(); break;
        case State.Footer: progressed = this.parseFooter(); break;
        case State.Device: this.advanceDevice(); return;
        case State.AfterEof: progressed = this.parseAfterEof(); break;
        case State.Done:
          if (this.q.available > 0) this.fail(this.q.consumed, 'unexpected data after the end of the stream');
          return;
        default: return;
      }
      if (!progressed) return;
    }
  }

  private finish(): void {
    const q = this.q;
    switch (this.state) {
      case State.Device: {
        const p = this.findCompleteTail();
        if (p < 0) {
          this.fail(q.consumed + q.available, 'stream ends without a section footer and EOF after the device state (truncated?)');
        }
        this.emitTail(p);
        return;
      }
      case State.AfterEof:
        if (q.available > 0) this.fail(q.consumed, 'stream ends inside the VMDESCRIPTION (truncated?)');
        return;
      case State.Done:
      case State.Failed:
        return;
      default:
        if (q.available > 0) this.fail(q.consumed, 'stream ends in the middle of a record (truncated?)', this.currentSection());
        if (q.consumed === 0) {
          // QEMU 7.2 with multifd on starts exec: and then fails before writing a byte.
          this.fail(0, 'empty stream: QEMU sent nothing (it failed before sending; with the multifd capability on, QEMU 7.2 does this through exec:, as multifd needs a socket URI)');
        }
        this.fail(q.consumed, 'stream ends before EOF (truncated?)', this.currentSection());
    }
  }

  private currentSection(): string | undefined {
    return this.state === State.RamBody || this.state === State.Footer ? 'ram' : undefined;
  }

  private parseHeader(): boolean {
    const q = this.q;
    if (q.available < 8) return false;
    const magic = q.u32At(0);
    if (magic !== QEMU_VM_FILE_MAGIC) {
      this.fail(0, `bad magic 0x${magic.toString(16).padStart(8, '0')}, not a QEMU migration stream (expected 0x5145564d "QEVM")`);
    }
    const version = q.u32At(4);
    if (version === QEMU_VM_FILE_VERSION_COMPAT) {
      this.fail(4, 'stream version 2 is obsolete and not supported (need version 3)');
    }
    if (version !== QEMU_VM_FILE_VERSION) this.fail(4, `unsupported stream version ${version} (need version 3)`);
    q.skip(8);
    this.push({ type: 'header', offset: 0, version });
    this.state = State.Top;
    return true;
  }

  private parseTop(): boolean {
    const q = this.q;
    if (q.available < 1) return false;
    const offset = q.consumed;
    const token = q.byteAt(0);
    switch (token) {
      case Token.CONFIGURATION: return this.parseConfiguration();
      case Token.COMMAND: return this.parseCommand();
      case Token.SECTION_START:
      case Token.SECTION_FULL: return this.parseSectionStart(token);
      case Token.SECTION_PART:
      case Token.SECTION_END: return this.parseSectionPart(token);
      case Token.EOF:
        q.skip(1);
        this.push({ type: 'eof', offset });
        this.state = State.AfterEof;
        return true;
      case Token.SECTION_FOOTER: return this.fail(offset, 'section footer outside of a section');
      case Token.VMDESCRIPTION: return this.fail(offset, 'VMDESCRIPTION before EOF');
      default: return this.fail(offset, `unknown token 0x${token.toString(16).padStart(2, '0')}`);
    }
  }

  private parseConfiguration(): boolean {
    const q = this.q;
    const offset = q.consumed;
    if (this.ramSectionId >= 0) this.fail(offset, 'CONFIGURATION after the first section');
    if (q.available < 5) return false;
    const len = q.u32At(1);
    if (len === 0 || len > MAX_MACHINE_NAME) this.fail(offset + 1, `absurd machine name length ${len} in CONFIGURATION`);
    let rel = 5 + len;
    if (q.available < rel) return false;
    const machine = q.stringAt(5, len);
    const subsections: ConfigurationSubsection[] = [];
    let pageSize: number | undefined;
    for (;;) {
      // Subsections have no terminator: the next top-level token ends the list.
      if (q.available < rel + 1) return false;
      if (q.byteAt(rel) !== Token.SUBSECTION) break;
      if (q.available < rel + 2) return false;
      const nl = q.byteAt(rel + 1);
      if (q.available < rel + 2 + nl + 4) return false;
      const name = q.stringAt(rel + 2, nl);
      const versionId = q.u32At(rel + 2 + nl);
      let p = rel + 6 + nl;
      if (name === 'configuration/target-page-bits') {
        if (q.available < p + 4) return false;
        const bits = q.u32At(p);
        p += 4;
        if (bits < 9 || bits > 16) this.fail(offset + rel, `target page bits ${bits} out of range 9..16 in CONFIGURATION`);
        pageSize = 1 << bits;
        subsections.push({ name, versionId, targetPageBits: bits });
      } else if (name === 'configuration/capabilities') {
        if (q.available < p + 4) return false;
        const count = q.u32At(p);
        if (count > MAX_CAPABILITIES) this.fail(offset + rel, `absurd capability count ${count} in CONFIGURATION`);
        p += 4;
        const capabilities: string[] = [];
        for (let i = 0; i < count; i++) {
          if (q.available < p + 1) return false;
          const cl = q.byteAt(p);
          if (q.available < p + 1 + cl) return false;
          capabilities.push(q.stringAt(p + 1, cl));
          p += 1 + cl;
        }
        subsections.push({ name, versionId, capabilities });
      } else if (name === 'configuration/uuid') {
        if (q.available < p + 16) return false;
        const hex = q.copyAt(p, 16).toString('hex');
        p += 16;
        const uuid = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
        subsections.push({ name, versionId, uuid });
      } else {
        this.fail(offset + rel, `unknown CONFIGURATION subsection "${printable(name, 64)}"`);
      }
      rel = p;
    }
    const raw = Buffer.from(q.take(rel).subarray(1));
    if (pageSize !== undefined) {
      this.pageSize = pageSize;
      this.mask = pageSize - 1;
    }
    for (const s of subsections) {
      if (s.name === 'configuration/capabilities' && s.capabilities.includes('x-ignore-shared')) this.ignoreShared = true;
    }
    this.push({ type: 'configuration', offset, machine, subsections, ...(pageSize !== undefined ? { pageSize } : {}), raw });
    return true;
  }

  private parseCommand(): boolean {
    const q = this.q;
    const offset = q.consumed;
    if (q.available < 5) return false;
    const command = q.u16At(1);
    const len = q.u16At(3);
    const args = COMMAND_ARGS.get(command);
    if (!args) this.fail(offset, `unknown command id ${command}`);
    if (args.len >= 0 && len !== args.len) {
      this.fail(offset, `command ${args.name} has length ${len}, expected ${args.len}`);
    }
    if (command === Command.POSTCOPY_ADVISE && len !== 0 && len !== 16) {
      this.fail(offset, `command POSTCOPY_ADVISE has length ${len}, expected 0 or 16`);
    }
    if (command === Command.ENABLE_COLO) {
      this.fail(offset, 'command ENABLE_COLO: COLO (the x-colo capability) cannot be saved; turn x-colo off');
    }
    if (command === Command.PACKAGED) {
      this.fail(offset, 'command PACKAGED (the source switched to postcopy) cannot be saved; use precopy');
    }
    if (q.available < 5 + len) return false;
    q.skip(5);
    const payload = Buffer.from(q.take(len));
    this.push({ type: 'command', offset, command, name: args.name, payload });
    return true;
  }

  private parseSectionStart(token: number): boolean {
    const q = this.q;
    const offset = q.consumed;
    if (q.available < 6) return false;
    const sectionId = q.u32At(1);
    const nl = q.byteAt(5);
    if (q.available < 14 + nl) return false;
    const idstr = q.stringAt(6, nl);
    const instanceId = q.u32At(6 + nl);
    const versionId = q.u32At(10 + nl);
    if (token === Token.SECTION_FULL) {
      if (idstr === 'ram') this.fail(offset, 'ram sent as a SECTION_FULL');
      if (!this.ramEnded) {
        // A background snapshot never ENDs the ram section: its last PART
        // (which held the last page) is followed by the device state that
        // was captured when the snapshot began. Anything else is a stream
        // that lost its RAM.
        if (this.ramSectionId < 0 || !this.memSizeSeen || !this.sawRamPart) {
          this.fail(offset, `device section "${printable(idstr, 64)}" arrives before the end of the ram section`);
        }
        this.ramEndedByDeviceState = true;
        this.ramEnded = true;
      }
      // Device sections carry no length: from here on everything is opaque.
      this.state = State.Device;
      this.tailScan = 0;
      return true;
    }
    if (idstr !== 'ram') {
      const why = ITERABLE_SECTION_CAPABILITY.get(idstr);
      this.fail(offset, `iterable section "${printable(idstr, 64)}" is not supported (only ram can be saved)${why ? `: ${why}` : ''}`);
    }
    if (this.ramSectionId >= 0) this.fail(offset, 'second START of section ram');
    if (versionId !== RAM_SECTION_VERSION) {
      this.fail(offset, `ram section version ${versionId} is not supported (expected ${RAM_SECTION_VERSION})`);
    }
    q.skip(14 + nl);
    this.ramSectionId = sectionId;
    this.inRamStart = true;
    this.push({ type: 'section-start', offset, sectionId, idstr, instanceId, versionId });
    this.state = State.RamBody;
    return true;
  }

  private parseSectionPart(token: number): boolean {
    const q = this.q;
    const offset = q.consumed;
    if (q.available < 5) return false;
    const sectionId = q.u32At(1);
    const kind = token === Token.SECTION_PART ? 'PART' : 'END';
    if (sectionId !== this.ramSectionId) this.fail(offset, `SECTION_${kind} for section id ${sectionId}, which was never started`);
    if (this.ramEnded) this.fail(offset, `SECTION_${kind} after the END of section ram`);
    q.skip(5);
    this.inRamEnd = token === Token.SECTION_END;
    this.sawRamPart = true;
    this.push({ type: token === Token.SECTION_PART ? 'section-part' : 'section-end', offset, sectionId, idstr: 'ram' });
    this.state = State.RamBody;
    return true;
  }

  private parseFooter(): boolean {
    const q = this.q;
    const offset = q.consumed;
    if (q.available < 1) return false;
    const token = q.byteAt(0);
    if (token !== Token.SECTION_FOOTER) {
      this.fail(offset, `missing section footer (found 0x${token.toString(16).padStart(2, '0')})`, 'ram');
    }
    if (q.available < 5) return false;
    const sectionId = q.u32At(1);
    if (sectionId !== this.ramSectionId) {
      this.fail(offset, `mismatched section footer: id ${sectionId}, expected ${this.ramSectionId}`, 'ram');
    }
    q.skip(5);
    this.push({ type: 'section-footer', offset, sectionId });
    if (this.inRamEnd) this.ramEnded = true;
    this.inRamStart = false;
    this.state = State.Top;
    return true;
  }

  /** One pass over as many RAM records as are complete. Returns true when the body ended (EOS). */
  private parseRam(): boolean {
    try {
      return this.parseRamRecords();
    } finally {
      // A run never outlives the pass: the next chunk may start a new one.
      this.flushPageRun();
    }
  }

  private parseRamRecords(): boolean {
    const q = this.q;
    const pageSize = this.pageSize;
    const mask = this.mask;
    for (;;) {
      if (q.available < 8) return false;
      const hi = q.u32At(0);
      const lo = q.u32At(4);
      const flags = lo & mask;
      const base = flags & ~RamFlag.CONTINUE;
      const offset = q.consumed;
      if (base === RamFlag.PAGE || base === RamFlag.ZERO) {
        const continued = (flags & RamFlag.CONTINUE) !== 0;
        let block: RamBlockInfo;
        let rel = 8;
        if (continued) {
          if (this.lastBlock === null) this.fail(offset, 'RAM record with CONTINUE but no previous block', 'ram');
          block = this.lastBlock;
        } else {
          if (q.available < 9) return false;
          const n = q.byteAt(8);
          if (q.available < 9 + n) return false;
          block = this.lookupBlock(n, offset);
          rel = 9 + n;
        }
        const address = hi * TWO32 + (lo - flags);
        if (address + pageSize > block.length) {
          this.fail(offset, `RAM page at 0x${address.toString(16)} is past the end of block "${printable(block.id, 64)}" (length 0x${block.length.toString(16)})`, 'ram');
        }
        const isPage = base === RamFlag.PAGE;
        const size = rel + (isPage ? pageSize : 1);
        if (q.available < size) return false;
        const at = q.headPos;
        if (this.pageRuns && at + size <= q.headChunk.length) {
          this.addToPageRun(offset, block, address, continued, isPage ? at + rel : -1 - q.byteAt(rel), size);
          q.skip(size);
          this.lastBlock = block;
          continue;
        }
        this.flushPageRun();
        if (isPage) {
          q.skip(rel);
          const data = q.take(pageSize);
          this.lastBlock = block;
          this.push({ type: 'ram-page', offset, block, address, data, continued });
        } else {
          const fill = q.byteAt(rel);
          q.skip(rel + 1);
          this.lastBlock = block;
          this.push({ type: 'ram-zero', offset, block, address, fill, continued });
        }
        continue;
      }
      this.flushPageRun();
      if ((flags & ~KNOWN_RAM_FLAGS) !== 0) {
        this.fail(offset, `unknown RAM flags 0x${flags.toString(16)}`, 'ram');
      }
      switch (base) {
        case RamFlag.EOS:
          q.skip(8);
          this.push({ type: 'ram-eos', offset });
          this.state = State.Footer;
          return true;
        case RamFlag.MULTIFD_FLUSH:
          q.skip(8);
          this.push({ type: 'ram-multifd-flush', offset });
          continue;
        case RamFlag.MEM_SIZE:
          if (!this.parseMemSize(hi, lo, flags)) return false;
          continue;
        case RamFlag.XBZRLE:
          if (!this.parseXbzrle(hi, lo, flags)) return false;
          continue;
        case RamFlag.COMPRESS_PAGE:
          if (!this.parseCompressed(hi, lo, flags)) return false;
          continue;
        default:
          if (base & RamFlag.HOOK) this.fail(offset, 'RDMA hook records are not supported', 'ram');
          this.fail(offset, `invalid RAM flag combination 0x${flags.toString(16)}`, 'ram');
      }
    }
  }

  /** The block of a PAGE-like record (its idstr, or the last block with CONTINUE) and the header's length; null while incomplete. */
  private recordBlock(flags: number, offset: number, what: string): [RamBlockInfo, number] | null {
    const q = this.q;
    if ((flags & RamFlag.CONTINUE) !== 0) {
      if (this.lastBlock === null) this.fail(offset, `${what} with CONTINUE but no previous block`, 'ram');
      return [this.lastBlock, 8];
    }
    if (q.available < 9) return null;
    const n = q.byteAt(8);
    if (q.available < 9 + n) return null;
    return [this.lookupBlock(n, offset), 9 + n];
  }

  /**
   * RAM_SAVE_FLAG_COMPRESS_PAGE (do_compress_ram_page in QEMU 7.2's ram.c):
   * the page header, be32 length (at most zlib's compressBound of a page, as
   * ram_load_precopy checks), the zlib stream. Inflated by the consumer.
   */
  private parseCompressed(hi: number, lo: number, flags: number): boolean {
    const q = this.q;
    const offset = q.consumed;
    const head = this.recordBlock(flags, offset, 'compressed page');
    if (head === null) return false;
    const [block, rel] = head;
    const address = hi * TWO32 + (lo - flags);
    if (address + this.pageSize > block.length) {
      this.fail(offset, `compressed page at 0x${address.toString(16)} is past the end of block "${printable(block.id, 64)}" (length 0x${block.length.toString(16)})`, 'ram');
    }
    if (q.available < rel + 4) return false;
    const len = q.u32At(rel);
    const bound = this.pageSize + (this.pageSize >>> 12) + (this.pageSize >>> 14) + 13;
    if (len > bound) this.fail(offset + rel, `compressed page of ${len} bytes is longer than zlib's bound for a page (${bound})`, 'ram');
    if (q.available < rel + 4 + len) return false;
    q.skip(rel + 4);
    const data = q.take(len);
    this.lastBlock = block;
    this.push({ type: 'ram-compressed', offset, block, address, data, continued: (flags & RamFlag.CONTINUE) !== 0 });
    return true;
  }

  /**
   * RAM_SAVE_FLAG_XBZRLE (save_xbzrle_page / load_xbzrle in ram.c): the page
   * header, u8 ENCODING_FLAG_XBZRLE, be16 length (at most one page), the
   * delta. The delta itself is applied by whoever holds the old page.
   */
  private parseXbzrle(hi: number, lo: number, flags: number): boolean {
    const q = this.q;
    const offset = q.consumed;
    const continued = (flags & RamFlag.CONTINUE) !== 0;
    const head = this.recordBlock(flags, offset, 'XBZRLE page');
    if (head === null) return false;
    const [block, rel] = head;
    const address = hi * TWO32 + (lo - flags);
    if (address + this.pageSize > block.length) {
      this.fail(offset, `XBZRLE page at 0x${address.toString(16)} is past the end of block "${printable(block.id, 64)}" (length 0x${block.length.toString(16)})`, 'ram');
    }
    if (q.available < rel + 3) return false;
    const encoding = q.byteAt(rel);
    if (encoding !== ENCODING_FLAG_XBZRLE) {
      this.fail(offset + rel, `XBZRLE page with encoding flag 0x${encoding.toString(16).padStart(2, '0')} (expected 0x01)`, 'ram');
    }
    const len = q.u16At(rel + 1);
    if (len > this.pageSize) this.fail(offset + rel + 1, `XBZRLE delta of ${len} bytes is longer than a page (${this.pageSize})`, 'ram');
    if (q.available < rel + 3 + len) return false;
    q.skip(rel + 3);
    const delta = q.take(len);
    this.lastBlock = block;
    this.push({ type: 'ram-xbzrle', offset, block, address, delta, continued });
    return true;
  }

  /** Adds a record lying wholly in the head chunk to the run, starting a new run when it cannot join. */
  private addToPageRun(offset: number, block: RamBlockInfo, address: number, continued: boolean, dataAt: number, size: number): void {
    const source = this.q.headChunk;
    if (this.runCount > 0 && (!continued || block !== this.runBlock || source !== this.runSource || this.runCount === PAGE_RUN_MAX)) {
      this.flushPageRun();
    }
    if (this.runCount === 0) {
      this.runBlock = block;
      this.runSource = source;
      this.runOffset = offset;
      this.runContinued = continued;
      this.runBytes = 0;
    }
    this.runAddresses[this.runCount] = address;
    this.runDataAt[this.runCount] = dataAt;
    this.runCount++;
    this.runBytes += size;
  }

  private flushPageRun(): void {
    const count = this.runCount;
    if (count === 0) return;
    this.runCount = 0;
    this.push({
      type: 'ram-page-run',
      offset: this.runOffset,
      block: this.runBlock as RamBlockInfo,
      count,
      addresses: this.runAddresses.slice(0, count),
      dataAt: this.runDataAt.slice(0, count),
      source: this.runSource,
      continued: this.runContinued,
      byteLength: this.runBytes,
    });
    this.runSource = EMPTY;
  }

  private lookupBlock(n: number, offset: number): RamBlockInfo {
    const q = this.q;
    const last = this.lastBlock;
    if (last !== null) {
      const id = this.blockIds[last.index];
      if (id.length === n && q.equalsAt(9, id)) return last;
    }
    for (let i = 0; i < this.blocks.length; i++) {
      const id = this.blockIds[i];
      if (id.length === n && q.equalsAt(9, id)) return this.blocks[i];
    }
    return this.fail(offset, `RAM record for unknown block "${printable(q.stringAt(9, n), 64)}"`, 'ram');
  }

  private u64At(rel: number, what: string): number {
    const hi = this.q.u32At(rel);
    if (hi >= 0x200000) this.fail(this.q.consumed + rel, `absurd ${what} 0x${hi.toString(16)}${this.q.u32At(rel + 4).toString(16).padStart(8, '0')}`, 'ram');
    return hi * TWO32 + this.q.u32At(rel + 4);
  }

  private parseMemSize(hi: number, lo: number, flags: number): boolean {
    const q = this.q;
    const offset = q.consumed;
    if (!this.inRamStart || this.memSizeSeen) this.fail(offset, 'MEM_SIZE outside the START of section ram', 'ram');
    if (hi >= 0x200000) this.fail(offset, 'absurd MEM_SIZE total', 'ram');
    const totalBytes = hi * TWO32 + (lo - flags);
    if (totalBytes > MAX_RAM_TOTAL) this.fail(offset, `absurd MEM_SIZE total ${totalBytes} bytes (more than 16 TiB)`, 'ram');
    const blocks: RamBlockInfo[] = [];
    let rel = 8;
    let sum = 0;
    while (sum < totalBytes) {
      if (blocks.length >= MAX_RAM_BLOCKS) this.fail(offset, `more than ${MAX_RAM_BLOCKS} RAM blocks in MEM_SIZE`, 'ram');
      if (q.available < rel + 1) return false;
      const n = q.byteAt(rel);
      if (n === 0) this.fail(q.consumed + rel, 'empty RAM block idstr in MEM_SIZE', 'ram');
      if (q.available < rel + 1 + n + 8) return false;
      const id = q.stringAt(rel + 1, n);
      const length = this.u64At(rel + 1 + n, 'RAM block length');
      if (blocks.some((b) => b.id === id)) this.fail(q.consumed + rel, `duplicate RAM block "${printable(id, 64)}" in MEM_SIZE`, 'ram');
      rel += 1 + n + 8;
      sum += length;
      if (sum > totalBytes) {
        this.fail(offset, `RAM block lengths exceed the MEM_SIZE total ${totalBytes} (at block "${printable(id, 64)}")`, 'ram');
      }
      // Optional per-block be64 fields (ram_save_setup): the block's page size
      // (postcopy-ram, huge pages) and its GPA (x-ignore-shared). They are
      // told apart from what follows because an idstr length byte is never 0
      // and a RAM record header always has a flag bit set; both extras are
      // below 2^56 and page aligned.
      const extras: number[] = [];
      const lastBlock = sum === totalBytes;
      while (extras.length < 2) {
        if (lastBlock) {
          if (q.available < rel + 8) return false;
          if ((q.u32At(rel + 4) & this.mask) !== 0) break;
        } else {
          if (q.available < rel + 1) return false;
          if (q.byteAt(rel) !== 0) break;
          if (q.available < rel + 8) return false;
        }
        extras.push(this.u64At(rel, `extra field of RAM block "${printable(id, 64)}"`));
        rel += 8;
      }
      const block: RamBlockInfo = { id, length, index: blocks.length };
      if (extras.length === 2) {
        block.pageSize = extras[0];
        block.mrAddr = extras[1];
      } else if (extras.length === 1) {
        if (this.ignoreShared) block.mrAddr = extras[0];
        else block.pageSize = extras[0];
      }
      if (block.pageSize !== undefined && (block.pageSize < 512 || (block.pageSize & (block.pageSize - 1)) !== 0 || block.pageSize > 2 ** 34)) {
        this.fail(offset, `RAM block "${printable(id, 64)}" has an invalid page size ${block.pageSize}`, 'ram');
      }
      blocks.push(block);
    }
    q.skip(rel);
    this.memSizeSeen = true;
    this.blocks = blocks;
    this.blockIds = blocks.map((b) => Buffer.from(b.id, 'latin1'));
    this.push({ type: 'ram-mem-size', offset, totalBytes, blocks });
    return true;
  }

  private parseAfterEof(): boolean {
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
    this.state = State.Done;
    return true;
  }

  private pushVmDescription(offset: number, raw: Buffer): void {
    let json: unknown;
    try {
      json = JSON.parse(raw.toString('utf8'));
    } catch {
      this.fail(offset, 'VMDESCRIPTION is not valid JSON');
    }
    this.push({ type: 'vmdescription', offset, json, raw: Buffer.from(raw) });
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
  private advanceDevice(): void {
    const q = this.q;
    let scan = this.tailScan;
    for (;;) {
      const at = q.indexOf(Token.SECTION_FOOTER, scan);
      if (at < 0) { scan = q.available; break; }
      // A ruled-out candidate stays ruled out: more data never revives it.
      if (this.tailAt(at) === Tail.No) { scan = at + 1; continue; }
      scan = at;
      break;
    }
    this.emitDevice(scan);
    this.tailScan = 0;
  }

  private emitDevice(n: number): void {
    const q = this.q;
    while (n > 0) {
      const offset = q.consumed;
      const data = q.headView(n);
      q.skip(data.length);
      n -= data.length;
      this.push({ type: 'device-state', offset, data });
    }
  }

  private findCompleteTail(): number {
    const q = this.q;
    let scan = this.tailScan;
    for (;;) {
      const at = q.indexOf(Token.SECTION_FOOTER, scan);
      if (at < 0) return -1;
      if (this.tailAt(at) === Tail.Complete) return at;
      scan = at + 1;
    }
  }

  private emitTail(p: number): void {
    const q = this.q;
    this.emitDevice(p + 5);
    this.push({ type: 'eof', offset: q.consumed });
    q.skip(1);
    if (q.available > 0) {
      const offset = q.consumed;
      const len = q.u32At(1);
      q.skip(5);
      this.pushVmDescription(offset, q.take(len));
    }
    this.state = State.Done;
  }
}
