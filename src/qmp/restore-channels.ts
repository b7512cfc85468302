// The sockets of a multifd restore (restore --qmp --channels N): qemu-snap
// connects to the destination's `migrate-incoming unix:PATH` once for the
// main stream and once per multifd channel, and spreads the RAM's data pages
// over the channels in MultiFDPacket_t packets (multifd-encoder.ts).
//
// Which connection is the main one: QEMU 7.2 takes the FIRST connection as
// the main channel (migration_ioc_process_incoming: !mis->from_src_file) and
// reads each later one's MultiFDInit_t at once, in its main loop; 8.x and
// later peek at the first 4 bytes of each connection (the stream's QEVM magic
// or multifd's 0x11223344), also in the main loop, sleeping until they come.
// So the main channel is connected first and given the stream's 8-byte file
// header at once, then each multifd channel is connected and given its init
// at once, one after the other: both rules see the same thing.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { QemuSnapError } from '../errors';
import { QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION } from '../migration/constants';
import { MultifdPacketBuilder, encodeMultifdInit, encodeMultifdSync } from '../migration/multifd-encoder';
import type { MultifdPageSink } from '../snapshot/load-encoder';

export class MultifdChannelSendError extends QemuSnapError {}

/** QEMU stopped reading the multifd channels: they stayed full for the whole stall time. */
export class MultifdStallError extends MultifdChannelSendError {}

/** Bytes queued per channel before the load waits for QEMU to read them. */
const CHANNEL_QUEUE_BYTES = 1 << 20;

/** A directory only we can use (mkdtemp: 0700) for the socket QEMU listens on. */
export async function privateSocketPath(): Promise<{ path: string; remove: () => Promise<void> }> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'qemu-snap-mig-'));
  return { path: path.join(dir, 'migration.sock'), remove: () => fs.promises.rm(dir, { recursive: true, force: true }) };
}

function fileHeader(): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0);
  b.writeUInt32BE(QEMU_VM_FILE_VERSION, 4);
  return b;
}

function connect(sockPath: string, what: string, signal?: AbortSignal): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(sockPath);
    const onAbort = () => {
      s.destroy();
      reject(new MultifdChannelSendError(`interrupted while connecting the ${what}`));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    s.once('error', (err) => {
      signal?.removeEventListener('abort', onAbort);
      reject(new MultifdChannelSendError(`cannot connect the ${what} to QEMU's ${sockPath}: ${err.message}`));
    });
    s.once('connect', () => {
      signal?.removeEventListener('abort', onAbort);
      s.removeAllListeners('error');
      resolve(s);
    });
  });
}

/**
 * The main stream into its socket, less the 8-byte file header that went
 * out when the channel was connected (checked to be the same bytes).
 */
class MainChannel extends Writable {
  private skip: Buffer;

  constructor(private readonly socket: net.Socket, sentHeader: Buffer) {
    super({ highWaterMark: 1 << 20 });
    this.skip = sentHeader;
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    if (this.skip.length > 0) {
      const n = Math.min(this.skip.length, chunk.length);
      if (!chunk.subarray(0, n).equals(this.skip.subarray(0, n))) return cb(new MultifdChannelSendError('the main stream does not start with the QEVM file header sent at connection'));
      this.skip = this.skip.subarray(n);
      chunk = chunk.subarray(n);
      if (chunk.length === 0) return cb();
    }
    if (this.socket.destroyed) return cb(new MultifdChannelSendError('main migration channel: QEMU closed it (EPIPE)'));
    if (this.socket.write(chunk)) return cb();
    const done = (err?: Error | null) => {
      this.socket.off('drain', onDrain);
      this.socket.off('close', onClose);
      cb(err);
    };
    const onDrain = () => done();
    const onClose = () => done(new MultifdChannelSendError('main migration channel: QEMU closed it (EPIPE)'));
    this.socket.on('drain', onDrain);
    this.socket.on('close', onClose);
  }

  override _final(cb: (err?: Error | null) => void): void {
    // Half-close: QEMU has the whole stream; it may still write to us.
    this.socket.end();
    cb();
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.socket.destroy();
    cb(err);
  }
}

/**
 * Spreads data pages over the channels: a packet holds pages of one block,
 * up to 512 KiB; each full packet goes to the channel with the least queued.
 * At a sync mark the open packet goes out and every channel gets a SYNC.
 */
export class MultifdChannelSender implements MultifdPageSink {
  private readonly builder: MultifdPacketBuilder;
  private packetNum = 0;
  private failure: Error | null = null;
  private waiters: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
  /** Packets and SYNCs handed to each channel (for tests and progress). */
  readonly packets: number[];
  syncs = 0;

  constructor(
    private readonly channels: net.Socket[],
    pageSize: number,
    readonly marks: 'eos' | 'flush',
    /** A wait for full channels longer than this fails the load (QEMU stopped reading them). */
    private readonly stallMs = 60_000,
  ) {
    this.builder = new MultifdPacketBuilder(pageSize);
    this.packets = channels.map(() => 0);
    channels.forEach((s, i) => {
      s.on('drain', () => this.wake());
      s.on('error', (err: NodeJS.ErrnoException) => this.fail(new MultifdChannelSendError(`multifd channel ${i}: ${err.code ?? err.message} (QEMU closed it)`)));
      s.on('close', () => this.fail(new MultifdChannelSendError(`multifd channel ${i}: QEMU closed it (EPIPE)`)));
    });
  }

  page(block: string, address: number, data: Buffer, at: number): void {
    const b = this.builder;
    if (b.pages > 0 && b.block !== block) this.send();
    if (b.pages === 0) b.begin(block);
    b.page(address, data, at);
    if (b.full) this.send();
  }

  sync(): void {
    if (this.builder.pages > 0) this.send();
    for (let i = 0; i < this.channels.length; i++) this.write(i, encodeMultifdSync(this.builder.pageSize, this.packetNum++));
    this.syncs++;
  }

  whenWritable(): Promise<void> | null {
    if (this.failure) return Promise.reject(this.failure);
    if (!this.overfull()) return null;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const queued = this.channels.map((c) => c.writableLength >>> 10).join(', ');
        this.fail(new MultifdStallError(`QEMU has read nothing from the full multifd channels for ${Math.round(this.stallMs / 1000)} s (KiB queued per channel: ${queued})`));
      }, this.stallMs);
      const done = () => clearTimeout(timer);
      this.waiters.push({
        resolve: () => {
          done();
          resolve();
        },
        reject: (err) => {
          done();
          reject(err);
        },
      });
    });
  }

  /** Ends the waits with `err` (an interrupted restore); later writes are dropped. */
  destroy(err: Error): void {
    this.fail(err);
  }

  private overfull(): boolean {
    return this.channels.some((s) => s.writableLength >= CHANNEL_QUEUE_BYTES);
  }

  private send(): void {
    let best = 0;
    for (let i = 1; i < this.channels.length; i++) if (this.channels[i].writableLength < this.channels[best].writableLength) best = i;
    const packet = this.builder.take(this.packetNum++);
    this.write(best, packet, () => this.builder.recycle(packet));
    this.packets[best]++;
  }

  private write(i: number, packet: Buffer, done?: () => void): void {
    if (this.failure) return;
    this.channels[i].write(packet, (err) => {
      if (!err) done?.();
    });
  }

  private wake(): void {
    if (this.failure || this.overfull()) return;
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.resolve();
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.reject(err);
  }

  /** Stops reporting closes as failures (the restore is over), then closes every channel. */
  close(): void {
    if (!this.failure) this.failure = new MultifdChannelSendError('multifd channels closed');
    for (const s of this.channels) s.destroy();
  }
}

export interface IncomingChannels {
  /** The main stream's destination (stdout of the load). */
  main: NodeJS.WritableStream;
  sender: MultifdChannelSender;
  /** Destroys every socket. */
  close(): void;
}

export interface ConnectChannelsOptions {
  channels: number;
  /** The destination's uuid (query-uuid): 7.2 and later check it against their own. */
  uuid: Buffer;
  pageSize: number;
  marks: 'eos' | 'flush';
  /** Sync marks in the leader (the stream before the first page): SYNCs sent before any page. */
  leaderMarks: number;
  /** See MultifdChannelSender (default 60 s). */
  stallMs?: number;
  signal?: AbortSignal;
}

/** Connects the main channel and `channels` multifd channels to QEMU's socket, in that order. */
export async function connectChannels(sockPath: string, opts: ConnectChannelsOptions): Promise<IncomingChannels> {
  const sockets: net.Socket[] = [];
  try {
    const main = await connect(sockPath, 'main migration channel', opts.signal);
    sockets.push(main);
    main.on('error', () => undefined);
    // Nothing comes back without a return path: read and dropped.
    main.resume();
    const header = fileHeader();
    main.write(header);
    const channels: net.Socket[] = [];
    for (let i = 0; i < opts.channels; i++) {
      const s = await connect(sockPath, `multifd channel ${i}`, opts.signal);
      sockets.push(s);
      channels.push(s);
      s.on('error', () => undefined);
      s.resume();
      s.write(encodeMultifdInit(opts.uuid, i));
    }
    const sender = new MultifdChannelSender(channels, opts.pageSize, opts.marks, opts.stallMs);
    for (let k = 0; k < opts.leaderMarks; k++) sender.sync();
    const mainOut = new MainChannel(main, header);
    mainOut.on('error', () => undefined);
    return {
      main: mainOut,
      sender,
      close: () => {
        sender.close();
        for (const s of sockets) s.destroy();
      },
    };
  } catch (err) {
    for (const s of sockets) s.destroy();
    throw err;
  }
}
