import { Transform } from 'streamx';
import { QemuSnapError } from '../errors';
import {
  Command,
  DEFAULT_PAGE_SIZE,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_FILE_VERSION_COMPAT,
  Token,
} from './constants';
import { StreamFormatError } from './errors';
import { printable } from '../util/text';
import { ChunkQueue } from './chunk-queue';
import { RamRecordParser } from './ram-records';
import { DeviceTail } from './device-tail';
import type {
  ConfigurationSubsection,
  FramedRecord,
  RamBlockInfo,
} from './records';

/** QEMU's `ram` section version (register_savevm_live("ram", 0, 4, ...)). */
const RAM_SECTION_VERSION = 4;
const MAX_MACHINE_NAME = 256;
const MAX_CAPABILITIES = 256;

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

export interface MigrationFramerOptions {
  /** Target page size when the stream has no target-page-bits subsection (default 4096). */
  pageSize?: number;
  /**
   * Emit runs of PAGE/ZERO records (`ram-page-run`) instead of one record per
   * page where the records lie in one input chunk (default false).
   */
  pageRuns?: boolean;
  /**
   * Called once, as soon as the bytes received end with the stream's tail
   * and QEMU's own VMDESCRIPTION (endsWithQemuDescription): nothing follows
   * it, so a save whose source waits for SHUT can end its input right then.
   */
  onQemuTail?: () => void;
}

/**
 * How far back from the end endsWithQemuDescription() looks for the tail:
 * QEMU's VM description is a few KiB to a few hundred; a longer one is
 * still found, after the save's quiet period.
 */
const VMDESC_WINDOW = 1 << 20;

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
  /** Section ram's body: page records and RAM blocks. */
  private readonly ram: RamRecordParser;
  /** Everything from the first device section on. */
  private readonly tail: DeviceTail;

  private ramSectionId = -1;
  private ramEnded = false;
  /** The device state followed a RAM PART without any END: a background-snapshot stream. */
  private ramEndedByDeviceState = false;
  private inRamEnd = false;
  private sawRamPart = false;
  private onQemuTail: (() => void) | undefined;

  constructor(opts: MigrationFramerOptions = {}) {
    super({ highWaterMark: 4 * 1024 * 1024, byteLengthReadable: recordByteLength });
    const pageSize = opts.pageSize ?? DEFAULT_PAGE_SIZE;
    if (!isValidPageSize(pageSize)) {
      throw new QemuSnapError(`invalid page size ${pageSize}: must be a power of two in 512..65536`);
    }
    this.ram = new RamRecordParser(this.q, this, pageSize, opts.pageRuns === true);
    this.tail = new DeviceTail(this.q, this);
    this.onQemuTail = opts.onQemuTail;
  }

  /** RAM blocks announced so far by MEM_SIZE. */
  get ramBlocks(): readonly RamBlockInfo[] {
    return this.ram.blocks;
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
    return this.ram.pageSize;
  }

  /** Total bytes received so far. */
  get bytesReceived(): number {
    return this.q.consumed + this.q.available;
  }

  /**
   * Like tailComplete(), but says whether the complete tail carries a
   * VMDESCRIPTION. A precopy source sends EOF and VMDESCRIPTION through the
   * same buffer, but the two can arrive apart: a tail that ends at EOF is
   * only trusted after a longer silence.
   */
  completeTail(): 'none' | 'eof' | 'vmdescription' {
    if (this.state === State.Device) {
      const p = this.tail.findComplete();
      if (p < 0) return 'none';
      return this.q.available > p + 6 ? 'vmdescription' : 'eof';
    }
    return this.tailComplete() ? 'eof' : 'none';
  }

  /**
   * True when the bytes received so far end with the stream's tail and a
   * VMDESCRIPTION that is QEMU's own (see DeviceTail.describesQemu): QEMU
   * writes nothing after it, so a source waiting for SHUT has sent all.
   * This is what lets a save end its input at once instead of after a
   * quiet period.
   */
  endsWithQemuDescription(): boolean {
    if (this.state !== State.Device) return false;
    const p = this.tail.findDescribedTail(VMDESC_WINDOW);
    return p >= 0 && this.tail.describesQemu(p);
  }

  /**
   * True when the bytes received so far end exactly with the stream's tail
   * (last footer + EOF, optionally + a complete VMDESCRIPTION), i.e. a source
   * that waits for SHUT on the return path has sent everything.
   */
  tailComplete(): boolean {
    switch (this.state) {
      case State.Device:
        return this.tail.findComplete() >= 0;
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
    const onQemuTail = this.onQemuTail;
    if (onQemuTail !== undefined && this.endsWithQemuDescription()) {
      this.onQemuTail = undefined;
      onQemuTail();
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
        case State.Device: this.tail.advance(); return;
        case State.AfterEof:
          progressed = this.tail.parseAfterEof();
          if (progressed) this.state = State.Done;
          break;
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
        const p = this.tail.findComplete();
        if (p < 0) {
          this.fail(q.consumed + q.available, 'stream ends without a section footer and EOF after the device state (truncated?)');
        }
        this.tail.emitTail(p);
        this.state = State.Done;
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
      this.ram.setPageSize(pageSize);
    }
    for (const s of subsections) {
      if (s.name === 'configuration/capabilities' && s.capabilities.includes('x-ignore-shared')) this.ram.ignoreShared = true;
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
        if (this.ramSectionId < 0 || !this.ram.memSizeSeen || !this.sawRamPart) {
          this.fail(offset, `device section "${printable(idstr, 64)}" arrives before the end of the ram section`);
        }
        this.ramEndedByDeviceState = true;
        this.ramEnded = true;
      }
      // Device sections carry no length: from here on everything is opaque.
      this.state = State.Device;
      this.tail.restart();
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
    this.ram.inRamStart = true;
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
    this.ram.inRamStart = false;
    this.state = State.Top;
    return true;
  }

  /** One pass over as many RAM records as are complete. Returns true when the body ended (EOS). */
  private parseRam(): boolean {
    if (!this.ram.parse()) return false;
    this.state = State.Footer;
    return true;
  }
}
