// The migration return path: messages a destination QEMU sends back to its
// source (be16 type, be16 length, payload), as written by migrate_send_rp_*
// in QEMU's migration/migration.c and read by source_return_path_thread.
//
// qemu-snap is a destination during `save` (we answer PING with PONG and
// finish with SHUT) and a source during `load --postcopy` (we read SHUT,
// PONG and page requests).

import { Transform } from 'streamx';
import { QemuSnapError } from '../errors';
import { Command, ReturnPathMessage } from './constants';

/** A return-path message that is malformed, unknown or out of range. */
export class ReturnPathError extends QemuSnapError {
  /** Byte offset of the offending message's header in the return path. */
  readonly offset: number;
  /** Message type as read from the wire (undefined when not known yet). */
  readonly messageType: number | undefined;

  constructor(offset: number, what: string, messageType?: number) {
    super(`bad return path message at byte ${offset}: ${what}`);
    this.offset = offset;
    this.messageType = messageType;
  }
}

/** Every message carries `at`: the byte offset of its header in the return path. */
export type ReturnPathMsg =
  | { type: 'shut'; status: number; at: number }
  | { type: 'pong'; value: number; at: number }
  | {
      type: 'req-pages';
      /** Byte offset of the first requested byte within the RAM block. */
      offset: number;
      /** Bytes requested (QEMU asks for one host page of the block). */
      length: number;
      /** Block named on the wire; null = same block as the previous request (REQ_PAGES). */
      rbName: string | null;
      /** The block the request is for (rbName, or the last named one). */
      block: string;
      at: number;
    }
  | { type: 'recv-bitmap'; block: string; at: number }
  | { type: 'resume-ack'; value: number; at: number }
  | { type: 'switchover-ack'; at: number };

/** Header size of every return-path message: be16 type + be16 length. */
export const RP_HEADER_SIZE = 4;
/**
 * source_return_path_thread reads payloads into a 512-byte buffer and rejects
 * anything longer, whatever the type.
 */
export const RP_MAX_PAYLOAD = 512;

interface RpType {
  name: string;
  /** Fixed payload length, or -1 when variable (rp_cmd_args in migration.c). */
  len: number;
}

const RP_TYPES: ReadonlyMap<number, RpType> = new Map<number, RpType>([
  [ReturnPathMessage.SHUT, { name: 'SHUT', len: 4 }],
  [ReturnPathMessage.PONG, { name: 'PONG', len: 4 }],
  [ReturnPathMessage.REQ_PAGES_ID, { name: 'REQ_PAGES_ID', len: -1 }],
  [ReturnPathMessage.REQ_PAGES, { name: 'REQ_PAGES', len: 12 }],
  [ReturnPathMessage.RECV_BITMAP, { name: 'RECV_BITMAP', len: -1 }],
  [ReturnPathMessage.RESUME_ACK, { name: 'RESUME_ACK', len: 4 }],
  [ReturnPathMessage.SWITCHOVER_ACK, { name: 'SWITCHOVER_ACK', len: 0 }],
]);

/** Name of a return-path message type, for messages and logs. */
export function returnPathTypeName(type: number): string {
  return RP_TYPES.get(type)?.name ?? `0x${type.toString(16).padStart(4, '0')}`;
}

export interface ReturnPathParserOptions {
  /**
   * RAM blocks of the image (idstr → used length in bytes). When given, page
   * requests for unknown blocks or past a block's end are errors.
   */
  blocks?: ReadonlyMap<string, number>;
  /**
   * Requests must start and end on this boundary (QEMU's source insists on
   * host-page alignment in migrate_handle_rp_req_pages). Default: no check.
   */
  pageSize?: number;
}

const TWO_POW_32 = 0x1_0000_0000;

function readU64(buf: Buffer, pos: number, at: number, type: number): number {
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4);
  // 2^53 bytes is far beyond any RAM block; refusing keeps offsets exact numbers.
  if (hi >= 0x20_0000) {
    throw new ReturnPathError(at, `${returnPathTypeName(type)} start 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is too large`, type);
  }
  return hi * TWO_POW_32 + lo;
}

/**
 * Splits the destination's return path into messages. Input chunks may cut
 * messages anywhere; output is one object per message. REQ_PAGES (no block
 * name) is resolved to the block of the last REQ_PAGES_ID, as QEMU's
 * ram_save_queue_pages does.
 */
// streamx's bundled typings make Transform generic over events, not data:
// input is Buffer, output is ReturnPathMsg (see push() calls below).
export class ReturnPathParser extends Transform {
  private pending: Buffer | null = null;
  /** Stream offset of pending[0] (or of the next chunk when nothing is pending). */
  private pos = 0;
  private lastBlock: string | null = null;
  private readonly blocks: ReadonlyMap<string, number> | undefined;
  private readonly pageSize: number | undefined;

  constructor(opts: ReturnPathParserOptions = {}) {
    super();
    if (opts.pageSize !== undefined && (!Number.isInteger(opts.pageSize) || opts.pageSize <= 0)) {
      throw new RangeError(`pageSize must be a positive integer, got ${opts.pageSize}`);
    }
    this.blocks = opts.blocks;
    this.pageSize = opts.pageSize;
  }

  /** Bytes consumed so far (complete messages only). */
  get bytesParsed(): number {
    return this.pos;
  }

  override _transform(data: unknown, cb: (err: Error | null, mapped?: unknown) => void): void {
    if (!Buffer.isBuffer(data)) {
      cb(new TypeError('ReturnPathParser takes Buffers'));
      return;
    }
    const chunk = data;
    let buf: Buffer;
    if (this.pending === null) {
      buf = chunk;
    } else {
      // Pending bytes are at most one partial message (< 516 bytes).
      buf = Buffer.concat([this.pending, chunk]);
      this.pending = null;
    }
    let p = 0;
    try {
      while (buf.length - p >= RP_HEADER_SIZE) {
        const type = buf.readUInt16BE(p);
        const len = buf.readUInt16BE(p + 2);
        const at = this.pos;
        this.checkHeader(type, len, at);
        if (buf.length - p - RP_HEADER_SIZE < len) break;
        const msg = this.decode(type, buf.subarray(p + RP_HEADER_SIZE, p + RP_HEADER_SIZE + len), at);
        p += RP_HEADER_SIZE + len;
        this.pos += RP_HEADER_SIZE + len;
        this.push(msg satisfies ReturnPathMsg);
      }
    } catch (err) {
      cb(err as Error);
      return;
    }
    if (p < buf.length) this.pending = Buffer.from(buf.subarray(p));
    cb(null);
  }

  override _flush(cb: (err: Error | null) => void): void {
    if (this.pending !== null && this.pending.length > 0) {
      const what =
        this.pending.length < RP_HEADER_SIZE
          ? `return path ended after ${this.pending.length} of 4 header bytes`
          : `return path ended inside a ${returnPathTypeName(this.pending.readUInt16BE(0))} message (${this.pending.length - RP_HEADER_SIZE} of ${this.pending.readUInt16BE(2)} payload bytes)`;
      cb(new ReturnPathError(this.pos, what));
      return;
    }
    cb(null);
  }

  private checkHeader(type: number, len: number, at: number): void {
    const t = RP_TYPES.get(type);
    if (t === undefined) {
      throw new ReturnPathError(at, `unknown message type ${returnPathTypeName(type)} (length ${len})`, type);
    }
    if ((t.len !== -1 && len !== t.len) || len > RP_MAX_PAYLOAD) {
      const expect = t.len === -1 ? `at most ${RP_MAX_PAYLOAD}` : String(t.len);
      throw new ReturnPathError(at, `${t.name} with length ${len}, expected ${expect}`, type);
    }
  }

  private decode(type: number, payload: Buffer, at: number): ReturnPathMsg {
    switch (type) {
      case ReturnPathMessage.SHUT:
        return { type: 'shut', status: payload.readUInt32BE(0), at };
      case ReturnPathMessage.PONG:
        return { type: 'pong', value: payload.readUInt32BE(0), at };
      case ReturnPathMessage.RESUME_ACK:
        return { type: 'resume-ack', value: payload.readUInt32BE(0), at };
      case ReturnPathMessage.SWITCHOVER_ACK:
        return { type: 'switchover-ack', at };
      case ReturnPathMessage.RECV_BITMAP: {
        if (payload.length < 1 || payload.length !== 1 + payload[0]) {
          throw new ReturnPathError(at, `RECV_BITMAP with length ${payload.length} does not hold its u8-counted block name`, type);
        }
        return { type: 'recv-bitmap', block: payload.toString('latin1', 1), at };
      }
      case ReturnPathMessage.REQ_PAGES: {
        if (this.lastBlock === null) {
          throw new ReturnPathError(at, 'REQ_PAGES before any REQ_PAGES_ID: no RAM block to refer to', type);
        }
        return this.request(payload, null, this.lastBlock, at, type);
      }
      case ReturnPathMessage.REQ_PAGES_ID: {
        // be64 start, be32 len, u8 n, n bytes of idstr: length must be 13 + n.
        const expected = payload.length >= 13 ? 13 + payload[12] : 13;
        if (payload.length !== expected) {
          throw new ReturnPathError(at, `REQ_PAGES_ID with length ${payload.length}, expected ${expected}`, type);
        }
        const name = payload.toString('latin1', 13);
        if (name.length === 0) throw new ReturnPathError(at, 'REQ_PAGES_ID with an empty block name', type);
        const msg = this.request(payload, name, name, at, type);
        this.lastBlock = name;
        return msg;
      }
      default:
        // checkHeader() lets only known types through.
        throw new ReturnPathError(at, `unknown message type ${returnPathTypeName(type)}`, type);
    }
  }

  private request(payload: Buffer, rbName: string | null, block: string, at: number, type: number): ReturnPathMsg {
    const offset = readU64(payload, 0, at, type);
    const length = payload.readUInt32BE(8);
    const what = `${returnPathTypeName(type)} for block ${block} offset 0x${offset.toString(16)} length 0x${length.toString(16)}`;
    if (length === 0) throw new ReturnPathError(at, `${what}: empty request`, type);
    if (this.pageSize !== undefined && (offset % this.pageSize !== 0 || length % this.pageSize !== 0)) {
      throw new ReturnPathError(at, `${what}: not aligned to the ${this.pageSize}-byte page size`, type);
    }
    if (this.blocks !== undefined) {
      const size = this.blocks.get(block);
      if (size === undefined) throw new ReturnPathError(at, `${what}: unknown RAM block`, type);
      if (offset + length > size) {
        throw new ReturnPathError(at, `${what}: past the block's end (0x${size.toString(16)} bytes)`, type);
      }
    }
    return { type: 'req-pages', offset, length, rbName, block, at };
  }
}

// ---- encoders (destination side: what we send during `save`) ----

/** One return-path message: be16 type, be16 payload length, payload. */
export function encodeReturnPathMessage(type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  if (!Number.isInteger(type) || type < 0 || type > 0xffff) throw new RangeError(`return path type ${type} is not a u16`);
  if (payload.length > RP_MAX_PAYLOAD) {
    throw new RangeError(`return path payload of ${payload.length} bytes exceeds QEMU's ${RP_MAX_PAYLOAD}-byte limit`);
  }
  const out = Buffer.allocUnsafe(RP_HEADER_SIZE + payload.length);
  out.writeUInt16BE(type, 0);
  out.writeUInt16BE(payload.length, 2);
  payload.copy(out, RP_HEADER_SIZE);
  return out;
}

function u32Message(type: number, value: number): Buffer {
  const out = Buffer.allocUnsafe(8);
  out.writeUInt16BE(type, 0);
  out.writeUInt16BE(4, 2);
  out.writeUInt32BE(value >>> 0, 4);
  return out;
}

/** SHUT: status 0 = all well; QEMU sends 1 when its input had an error. */
export function encodeShut(status: number): Buffer {
  return u32Message(ReturnPathMessage.SHUT, status);
}

/** SWITCHOVER_ACK (QEMU >= 8.1): the destination is ready for the source to switch over. */
export function encodeSwitchoverAck(): Buffer {
  return encodeReturnPathMessage(ReturnPathMessage.SWITCHOVER_ACK);
}

/**
 * Whether a source running `machine` (a versioned type such as pc-q35-10.0,
 * which only QEMU of that version or later has) knows SWITCHOVER_ACK.
 *
 * With the switchover-ack capability a QEMU destination sends it right after
 * OPEN_RETURN_PATH when no device asked to delay it (loadvm_process_command),
 * and the source does not complete until it arrives. A source with the
 * capability off just notes it (source_return_path_thread), but one older
 * than 8.1 fails the migration on the unknown message type. The stream does
 * not say whether the capability is on, so it is sent whenever the machine
 * type proves QEMU >= 8.1; an unversioned or older type gets none.
 */
export function sourceKnowsSwitchoverAck(machine: string | null): boolean {
  const m = machine === null ? null : /-(\d+)\.(\d+)$/.exec(machine);
  if (!m) return false;
  const major = Number(m[1]);
  const minor = Number(m[2]);
  return major > 8 || (major === 8 && minor >= 1);
}

/** PONG echoing a PING's be32 value. */
export function encodePong(value: number): Buffer {
  return u32Message(ReturnPathMessage.PONG, value);
}

/**
 * A page request as migrate_send_rp_message_req_pages writes it: REQ_PAGES_ID
 * when `block` is given, REQ_PAGES (same block as before) otherwise. Used by
 * tests and fake destinations.
 */
export function encodeReqPages(offset: number, length: number, block?: string): Buffer {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`request offset ${offset} is not a non-negative integer`);
  if (!Number.isInteger(length) || length < 0 || length > 0xffffffff) throw new RangeError(`request length ${length} is not a u32`);
  const name = block === undefined ? null : Buffer.from(block, 'latin1');
  if (name !== null && (name.length === 0 || name.length > 255)) throw new RangeError(`block name "${block}" must be 1..255 bytes`);
  const payload = Buffer.alloc(12 + (name === null ? 0 : 1 + name.length));
  payload.writeUInt32BE(Math.floor(offset / TWO_POW_32), 0);
  payload.writeUInt32BE(offset % TWO_POW_32, 4);
  payload.writeUInt32BE(length, 8);
  if (name !== null) {
    payload[12] = name.length;
    name.copy(payload, 13);
  }
  return encodeReturnPathMessage(name === null ? ReturnPathMessage.REQ_PAGES : ReturnPathMessage.REQ_PAGES_ID, payload);
}

/**
 * What a destination must answer on its return path while it reads a source's
 * stream (loadvm_process_command in savevm.c): nothing until OPEN_RETURN_PATH,
 * a PONG per PING, and one SHUT when the stream is done.
 */
export class ReturnPathResponder {
  private isOpen = false;
  private isShut = false;

  /** True once OPEN_RETURN_PATH was seen: the source expects SHUT at the end. */
  get opened(): boolean {
    return this.isOpen;
  }

  get shutSent(): boolean {
    return this.isShut;
  }

  /**
   * Feed one COMMAND record (id and payload) from the incoming stream.
   * Returns the bytes to write to the return path, or null for none.
   * `offset` is the command's stream offset, used in errors.
   */
  onCommand(cmd: number, payload: Buffer, offset = -1): Buffer | null {
    switch (cmd) {
      case Command.OPEN_RETURN_PATH:
        // QEMU logs a second OPEN_RETURN_PATH and carries on.
        this.isOpen = true;
        return null;
      case Command.PING: {
        if (payload.length !== 4) {
          throw new ReturnPathError(offset, `PING command with a ${payload.length}-byte payload, expected 4`, cmd);
        }
        if (!this.isOpen) {
          // QEMU's destination fails the migration here too.
          throw new ReturnPathError(offset, `PING 0x${payload.readUInt32BE(0).toString(16)} received before OPEN_RETURN_PATH`, cmd);
        }
        if (this.isShut) return null;
        return encodePong(payload.readUInt32BE(0));
      }
      default:
        return null;
    }
  }

  /** The final SHUT (once, and only if the source opened the return path). */
  shut(status = 0): Buffer | null {
    if (!this.isOpen || this.isShut) return null;
    this.isShut = true;
    return encodeShut(status);
  }
}
