// Source-side COMMAND records for a postcopy load, byte for byte as QEMU's
// qemu_savevm_command_send and qemu_savevm_send_* (migration/savevm.c) write
// them: token 0x08, be16 command, be16 payload length, payload.
// docs/postcopy-protocol.md describes the order a destination accepts.

import { QemuSnapError } from '../errors';
import { Command, Token } from './constants';

/** A postcopy command we were asked to build would break QEMU's limits. */
export class PostcopyEncodeError extends QemuSnapError {
  constructor(what: string) {
    super(`cannot encode postcopy command: ${what}`);
  }
}

/** Token + be16 command + be16 length. */
export const COMMAND_HEADER_SIZE = 5;
/** The be16 length field bounds every command payload. */
export const MAX_COMMAND_PAYLOAD = 0xffff;
/** MAX_VM_CMD_PACKAGED_SIZE in QEMU 7.2 and master (savevm.c): UINT32_MAX. */
export const MAX_PACKAGED_SIZE = 0xffffffff;
/**
 * MAX_DISCARDS_PER_COMMAND in postcopy-ram.c: what QEMU's own source puts in
 * one POSTCOPY_RAM_DISCARD. The destination only needs the payload to fit
 * the be16 length, so more are allowed through `maxRangesPerCommand`.
 */
export const QEMU_DISCARDS_PER_COMMAND = 12;
/** postcopy_ram_discard_version in savevm.c. */
export const POSTCOPY_RAM_DISCARD_VERSION = 0;

const EMPTY = Buffer.alloc(0);
const TWO_POW_32 = 0x1_0000_0000;

function writeU64(buf: Buffer, value: number | bigint, pos: number, what: string): void {
  if (typeof value === 'bigint') {
    if (value < 0n || value > 0xffff_ffff_ffff_ffffn) throw new PostcopyEncodeError(`${what} ${value} is not a u64`);
    buf.writeBigUInt64BE(value, pos);
    return;
  }
  if (!Number.isSafeInteger(value) || value < 0) throw new PostcopyEncodeError(`${what} ${value} is not a non-negative integer`);
  buf.writeUInt32BE(Math.floor(value / TWO_POW_32), pos);
  buf.writeUInt32BE(value % TWO_POW_32, pos + 4);
}

/** A complete top-level COMMAND record. */
export function encodeCommand(cmd: number, payload: Buffer = EMPTY): Buffer {
  if (!Number.isInteger(cmd) || cmd <= 0 || cmd > 0xffff) throw new PostcopyEncodeError(`command id ${cmd} is not a u16 above 0`);
  if (payload.length > MAX_COMMAND_PAYLOAD) {
    throw new PostcopyEncodeError(`command ${cmd} payload of ${payload.length} bytes does not fit the be16 length`);
  }
  const out = Buffer.allocUnsafe(COMMAND_HEADER_SIZE + payload.length);
  out[0] = Token.COMMAND;
  out.writeUInt16BE(cmd, 1);
  out.writeUInt16BE(payload.length, 3);
  payload.copy(out, COMMAND_HEADER_SIZE);
  return out;
}

/** OPEN_RETURN_PATH: the destination starts writing to its return path. */
export function encodeOpenReturnPath(): Buffer {
  return encodeCommand(Command.OPEN_RETURN_PATH);
}

/** PING: the destination answers PONG with the same be32 value. */
export function encodePing(value: number): Buffer {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new PostcopyEncodeError(`PING value ${value} is not a u32`);
  const payload = Buffer.allocUnsafe(4);
  payload.writeUInt32BE(value, 0);
  return encodeCommand(Command.PING, payload);
}

/**
 * POSTCOPY_ADVISE with postcopy-ram on: be64 ram_pagesize_summary() (the OR
 * of every RAM block's page size) and be64 target page size. The destination
 * compares both with its own and fails on a mismatch; it also fails when its
 * postcopy-ram capability is off ("RAM postcopy is disabled but have 16 byte
 * advise").
 */
export function encodePostcopyAdvise(hostPageSizeSummary: bigint | number, targetPageSize: number): Buffer {
  const payload = Buffer.allocUnsafe(16);
  writeU64(payload, hostPageSizeSummary, 0, 'page size summary');
  writeU64(payload, targetPageSize, 8, 'target page size');
  return encodeCommand(Command.POSTCOPY_ADVISE, payload);
}

/** POSTCOPY_LISTEN: the destination starts its listen thread on the main stream. */
export function encodePostcopyListen(): Buffer {
  return encodeCommand(Command.POSTCOPY_LISTEN);
}

/** POSTCOPY_RUN: the destination starts the guest (and stops reading the package). */
export function encodePostcopyRun(): Buffer {
  return encodeCommand(Command.POSTCOPY_RUN);
}

export interface DiscardRange {
  /** Byte offset within the RAM block. */
  start: number;
  /** Bytes to discard. */
  length: number;
}

export interface RamDiscardOptions {
  /** Ranges per command; default 12 as QEMU's source. At most what the be16 length allows. */
  maxRangesPerCommand?: number;
  /** When given, starts and lengths must be multiples of it (the destination requires the block's page size). */
  pageSize?: number;
}

/** How many 16-byte ranges fit one discard command for a block name of `nameLength` bytes. */
export function maxDiscardRanges(nameLength: number): number {
  return Math.floor((MAX_COMMAND_PAYLOAD - 3 - nameLength) / 16);
}

/**
 * POSTCOPY_RAM_DISCARD commands for one RAM block: u8 version 0, u8 name
 * length, name, u8 0, then be64 start / be64 length pairs, in bytes within
 * the block (postcopy_discard_send_range converts QEMU's page numbers to
 * bytes). Split into several commands when there are many ranges; no ranges
 * gives no command.
 */
export function encodeRamDiscard(blockId: string, ranges: ReadonlyArray<DiscardRange>, opts: RamDiscardOptions = {}): Buffer[] {
  const name = Buffer.from(blockId, 'latin1');
  // loadvm_postcopy_ram_handle_discard refuses payloads under 20 bytes, so a
  // nameless block could not be discarded anyway.
  if (name.length === 0 || name.length > 255) throw new PostcopyEncodeError(`RAM block name "${blockId}" must be 1..255 bytes`);
  const fit = maxDiscardRanges(name.length);
  const per = opts.maxRangesPerCommand ?? QEMU_DISCARDS_PER_COMMAND;
  if (!Number.isInteger(per) || per < 1 || per > fit) {
    throw new PostcopyEncodeError(`maxRangesPerCommand ${per} must be 1..${fit} for block ${blockId}`);
  }
  const ps = opts.pageSize;
  for (const r of ranges) {
    if (!Number.isSafeInteger(r.start) || r.start < 0 || !Number.isSafeInteger(r.length) || r.length <= 0) {
      throw new PostcopyEncodeError(`discard range start ${r.start} length ${r.length} in block ${blockId} is not a non-empty byte range`);
    }
    if (ps !== undefined && (r.start % ps !== 0 || r.length % ps !== 0)) {
      throw new PostcopyEncodeError(`discard range 0x${r.start.toString(16)}+0x${r.length.toString(16)} in block ${blockId} is not aligned to ${ps} bytes`);
    }
  }
  const out: Buffer[] = [];
  const head = 3 + name.length;
  for (let i = 0; i < ranges.length; i += per) {
    const n = Math.min(per, ranges.length - i);
    const payload = Buffer.alloc(head + 16 * n);
    payload[0] = POSTCOPY_RAM_DISCARD_VERSION;
    payload[1] = name.length;
    name.copy(payload, 2);
    payload[2 + name.length] = 0;
    let p = head;
    for (let j = i; j < i + n; j++) {
      writeU64(payload, ranges[j].start, p, 'discard start');
      writeU64(payload, ranges[j].length, p + 8, 'discard length');
      p += 16;
    }
    out.push(encodeCommand(Command.POSTCOPY_RAM_DISCARD, payload));
  }
  return out;
}

/**
 * PACKAGED: be32 length, then that many bytes of a nested stream, which the
 * destination reads completely before loading it. Returns the command
 * followed by the inner buffers themselves (not copied).
 */
export function encodePackaged(inner: ReadonlyArray<Buffer>): Buffer[] {
  let total = 0;
  for (const b of inner) total += b.length;
  if (total > MAX_PACKAGED_SIZE) {
    throw new PostcopyEncodeError(`packaged device state of ${total} bytes exceeds QEMU's MAX_VM_CMD_PACKAGED_SIZE (${MAX_PACKAGED_SIZE} bytes)`);
  }
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32BE(total, 0);
  return [encodeCommand(Command.PACKAGED, len), ...inner];
}

/**
 * The switch-over package: LISTEN, the device state, RUN. `deviceState` must
 * be the device FULL sections only: no EOF (an EOF would end the package
 * before RUN) and no VMDESCRIPTION (not a token the package loop accepts).
 */
export function encodeListenPackage(deviceState: ReadonlyArray<Buffer>): Buffer[] {
  return encodePackaged([encodePostcopyListen(), ...deviceState, encodePostcopyRun()]);
}

/** A bitmap read a byte at a time (one allocated in slabs on demand). */
export interface SparseBits {
  readonly length: number;
  byteAt(index: number): number;
}

/**
 * Byte ranges of pages NOT set in a per-page bitmap (bit i of byte i>>3, LSB
 * first = page i sent), merged: what to discard for one block.
 */
export function unsentRanges(bits: Uint8Array | SparseBits, pageCount: number, pageSize: number): DiscardRange[] {
  if (pageCount > bits.length * 8) throw new RangeError(`bitmap of ${bits.length} bytes is too short for ${pageCount} pages`);
  // Page numbers may pass 2^32 (16 TiB of 512-byte pages): no >>> on them.
  const byteOf = bits instanceof Uint8Array ? (p: number) => bits[Math.floor(p / 8)] : (p: number) => bits.byteAt(Math.floor(p / 8));
  const out: DiscardRange[] = [];
  let i = 0;
  while (i < pageCount) {
    const byte = byteOf(i);
    if (byte === 0xff && i % 8 === 0) {
      i += 8;
      continue;
    }
    if ((byte >>> i % 8) & 1) {
      i++;
      continue;
    }
    const first = i;
    while (i < pageCount) {
      const b = byteOf(i);
      if (b === 0 && i % 8 === 0 && i + 8 <= pageCount) {
        i += 8;
        continue;
      }
      if ((b >>> i % 8) & 1) break;
      i++;
    }
    out.push({ start: first * pageSize, length: (i - first) * pageSize });
  }
  return out;
}
