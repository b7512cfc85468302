// Main-stream records and multifd channel packets → one record stream, in
// an order that stores what a QEMU destination would.
//
//   main channel ─▶ MigrationFramer ─┐
//   channel 0 ─▶ MultifdChannelParser ┼─▶ MultifdMerger ─▶ (SnapshotWriter)
//   channel k ─▶ MultifdChannelParser ┘
//
// Why this order is right (QEMU 7.2 ram.c/multifd.c, and 10.0's
// multifd-nocomp.c): the source sends a page at most once between two sync
// points, because it only re-reads the dirty bitmap between two iterations
// and every iteration ends with a sync point (7.2: multifd_send_sync_main and
// EOS in ram_save_iterate; 10.0 with its own machine types: a sync and
// MULTIFD_FLUSH when find_dirty_block wraps around the RAM, the only place a
// new pass begins). A sync point is one SYNC packet on every channel, sent
// after that channel's earlier pages, then the mark (EOS or MULTIFD_FLUSH)
// on the main stream. QEMU's destination applies channel pages in threads
// as they come, but each channel thread stops after its SYNC until the main
// thread reaches the mark and has seen every channel's SYNC
// (multifd_recv_sync_main). So, numbering the marks 0, 1, ...: a page a
// channel carries after its k-th SYNC is applied after every page of every
// channel before their k-th SYNC and after every main-stream record before
// mark k; main-stream records after mark k come after every channel's pages
// before its k-th SYNC. Pages of the same epoch never overlap (sent at most
// once per epoch), so any order within an epoch gives the same RAM.
//
// This stream enforces exactly that: a channel packet of epoch e (SYNCs
// before it on its channel) is passed on only once the main stream has gone
// past mark e-1, and mark e is passed on only once every channel has
// delivered its e-th SYNC; main records between marks go as they come, and
// the channels' packets of one epoch go merged by address (for the write
// order only: see drainChannels). A page re-sent
// after a sync point thus reaches the writer after its earlier copy, whichever
// channel carried either. Like QEMU's destination threads, a channel that is
// a sync point ahead is not read until the main stream catches up, so the
// socket's own flow control holds it back.
//
// Which record is the mark: QEMU 8.0 and later send MULTIFD_FLUSH for sync
// points unless the machine type asks for one per section (7.2-era types,
// multifd-flush-after-each-section), and 7.2 only knows EOS. ram_save_setup
// ends with a sync point either way, and in flush mode it writes
// MULTIFD_FLUSH before its EOS: the first mark of the stream tells which.
import { Duplex } from 'streamx';
import { QemuSnapError } from '../errors';
import { MultifdChannelParser, MultifdPacketRecord, MultifdRecord } from './multifd';
import type { FramedRecord, RamBlockInfo, RamPageRunRecord } from './records';

export class MultifdMergeError extends QemuSnapError {}

/** A source of one channel's bytes: a socket, paused until the merger reads it. */
export interface ChannelSource {
  on(event: 'data', fn: (chunk: Buffer) => void): unknown;
  on(event: 'end' | 'close', fn: () => void): unknown;
  on(event: 'error', fn: (err: Error) => void): unknown;
  pause(): unknown;
  resume(): unknown;
}

interface Channel {
  /** The number the source gave it (from its init), -1 before. */
  id: number;
  source: ChannelSource;
  /** Bytes that arrived before parsing could start. */
  prefix: Buffer[];
  parser: MultifdChannelParser | null;
  /** The channel's next packet, read and not yet passed on (it may be of a later epoch than the main stream's). */
  head: MultifdPacketRecord | null;
  /** SYNC packets passed on. */
  syncs: number;
  /** The channel's bytes ended (cleanly or not). */
  closed: boolean;
  /** Closed, and every record of it was read: it can deliver nothing more. */
  drained: boolean;
}

type Mark = 'ram-eos' | 'ram-multifd-flush';

export interface MultifdMergerOptions {
  /** Channels QEMU opens (multifd-channels): every sync point waits for all of them. */
  channels: number;
  /** Page size when the stream's configuration does not name one (default 4096). */
  pageSize?: number;
}

export class MultifdMerger extends Duplex {
  private readonly expected: number;
  private readonly channels: Channel[] = [];
  private pageSize: number;
  private blocks: Map<string, RamBlockInfo> | null = null;
  /** Marks the main stream has passed on. */
  private epoch = 0;
  private mark: Mark | null = null;
  /** The main record waiting to be passed on (a mark waiting for SYNCs, or backpressure). */
  private mainRecord: FramedRecord | null = null;
  private mainDone: ((err: Error | null) => void) | null = null;
  /** Offset of the last main record passed on: channel runs carry it (stream bytes before it are done). */
  private mainOffset = 0;
  /** push() said the reader is full: wait for _read. */
  private blocked = false;
  private stepping = false;
  private ended = false;
  /** Pages and SYNC packets passed on from the channels. */
  packets = 0;
  pages = 0;
  /** Bytes received on the channels. */
  channelBytes = 0;

  constructor(opts: MultifdMergerOptions) {
    super({
      highWaterMark: 4 << 20,
      byteLengthReadable: (r: unknown) => ((r as FramedRecord).type === 'ram-page-run' ? (r as RamPageRunRecord).byteLength : 64),
      byteLengthWritable: (r: unknown) => ((r as FramedRecord).type === 'ram-page-run' ? (r as RamPageRunRecord).byteLength : 64),
    });
    if (!Number.isInteger(opts.channels) || opts.channels < 1) throw new RangeError(`multifd channels must be a positive whole number, got ${opts.channels}`);
    this.expected = opts.channels;
    this.pageSize = opts.pageSize ?? 4096;
  }

  /** Channels attached so far. */
  get attached(): number {
    return this.channels.length;
  }

  /**
   * A multifd channel's connection, from its first byte. The source is
   * paused and resumed as the merger needs its data.
   */
  addChannel(source: ChannelSource): void {
    if (this.channels.length >= this.expected) {
      this.destroy(new MultifdMergeError(`QEMU opened more multifd channels than the ${this.expected} asked for`));
      return;
    }
    const ch: Channel = { id: -1, source, prefix: [], parser: null, head: null, syncs: 0, closed: false, drained: false };
    this.channels.push(ch);
    source.pause();
    source.on('data', (chunk) => {
      this.channelBytes += chunk.length;
      if (ch.parser === null) {
        ch.prefix.push(chunk);
        source.pause();
      } else if (!ch.parser.write(chunk)) source.pause();
    });
    // 'close' without 'end': reset or destroyed. Either way no more bytes.
    const onEnd = () => {
      if (ch.closed) return;
      ch.closed = true;
      if (ch.parser === null) ch.drained = true;
      else ch.parser.end(undefined);
      this.step();
    };
    source.on('end', onEnd);
    source.on('close', onEnd);
    source.on('error', (err) => this.fail(new MultifdMergeError(`multifd channel ${this.channels.indexOf(ch) + 1} of ${this.expected}: ${err.message}`)));
    if (this.blocks !== null) this.startChannel(ch);
  }

  /** Parsing needs the RAM block list: starts once the main stream's MEM_SIZE passed. */
  private startChannel(ch: Channel): void {
    const parser = new MultifdChannelParser({ pageSize: this.pageSize, blockLength: (id) => this.blocks?.get(id)?.length });
    ch.parser = parser;
    parser.on('readable', () => this.step());
    parser.on('drain', () => ch.source.resume());
    parser.on('end', () => {
      ch.drained = true;
      this.step();
    });
    parser.on('error', (err: Error) => this.fail(err));
    for (const chunk of ch.prefix) parser.write(chunk);
    ch.prefix = [];
    ch.drained = false;
    if (ch.closed) parser.end(undefined);
    else ch.source.resume();
  }

  override _write(rec: FramedRecord, cb: (err: Error | null) => void): void {
    this.mainRecord = rec;
    this.mainDone = cb;
    this.step();
  }

  override _read(cb: (err: Error | null) => void): void {
    this.blocked = false;
    cb(null);
    this.step();
  }

  override _final(cb: (err: Error | null) => void): void {
    // The main stream is complete (its EOF, and VMDESCRIPTION): every sync
    // point passed, so every channel page was passed on. QEMU closes the
    // channels only after it heard our SHUT; a packet with pages still held
    // here would be one sent after the last sync point, which QEMU never does.
    this.ended = true;
    this.step();
    for (const ch of this.channels) {
      const head = ch.parser ? this.fillHead(ch) : null;
      if (head !== null && head.normal.length + head.zero.length > 0) {
        return cb(new MultifdMergeError(`multifd channel ${head.channel} sent pages after the main stream's last sync point (packet ${head.packetNum})`));
      }
    }
    this.push(null);
    cb(null);
  }

  /**
   * streamx finishes destroying only once no _write is pending, and a main
   * record waiting at a sync point would wait forever: let it go.
   */
  override destroy(err?: Error | null): void {
    super.destroy(err ?? undefined);
    const done = this.mainDone;
    this.mainDone = null;
    this.mainRecord = null;
    done?.(null);
  }

  override _destroy(cb: (err: Error | null) => void): void {
    for (const ch of this.channels) {
      ch.parser?.destroy();
      ch.source.pause();
    }
    cb(null);
  }

  private fail(err: Error): void {
    // After the main stream's end the channels only close: nothing to fail.
    if (this.ended) return;
    this.destroy(err);
  }

  /** Passes on whatever the ordering rule allows, until nothing more can go. */
  private step(): void {
    if (this.stepping || this.destroying || this.destroyed) return;
    this.stepping = true;
    try {
      let progress = true;
      while (progress && !this.blocked) {
        progress = this.drainChannels();
        if (this.blocked) break;
        if (this.mainRecord !== null && this.passMain()) progress = true;
      }
    } catch (err) {
      this.fail(err as Error);
    } finally {
      this.stepping = false;
    }
  }

  /** The channel's next packet (reading past its init), or null while none has arrived. */
  private fillHead(ch: Channel): MultifdPacketRecord | null {
    while (ch.head === null && ch.parser !== null) {
      const rec = ch.parser.read() as MultifdRecord | null;
      if (rec === null) break;
      if (rec.type === 'multifd-init') {
        if (this.channels.some((c) => c !== ch && c.id === rec.channel)) throw new MultifdMergeError(`two multifd channels both say they are channel ${rec.channel}`);
        ch.id = rec.channel;
      } else {
        ch.head = rec;
      }
    }
    return ch.head;
  }

  /**
   * Channel packets up to the main stream's epoch, merged by RAM address.
   * Within an epoch QEMU scans RAM upwards once (7.2: an iteration has one
   * dirty bitmap; 10.0: an epoch is one pass, the sync comes where the scan
   * wraps) and hands each packet to whichever channel is free, so each
   * channel's packets ascend; a k-way merge of the channels' heads keeps the
   * writes in address order, and each digest chunk is then hashed as it is
   * written instead of read back at the end. Only a matter of speed: pages
   * of one epoch never overlap. A live channel with nothing read yet that
   * still owes this epoch's SYNC is waited for: QEMU gives the next packet
   * to a free channel, so it gets one, or its SYNC, while the others are
   * held. True if any went.
   */
  private drainChannels(): boolean {
    let moved = false;
    while (!this.blocked && !this.ended) {
      let best: MultifdPacketRecord | null = null;
      let bestKey = 0;
      let from: Channel | null = null;
      let waiting = false;
      for (const ch of this.channels) {
        const head = this.fillHead(ch);
        if (head === null) {
          // Live and still owing this epoch's SYNC: its next packet may come first.
          if (ch.parser !== null && !ch.drained && ch.syncs <= this.epoch) waiting = true;
          continue;
        }
        // A sync point ahead of the main stream: wait for its mark.
        if (head.epoch > this.epoch) continue;
        const key = this.addressKey(head);
        if (best === null || key < bestKey) {
          best = head;
          bestKey = key;
          from = ch;
        }
      }
      if (best === null || from === null) break;
      // A SYNC (no pages) goes at once; pages wait until every live channel shows its next.
      if (waiting && bestKey >= 0) break;
      from.head = null;
      moved = true;
      this.packets++;
      if (best.sync) from.syncs++;
      if (best.normal.length + best.zero.length > 0) {
        this.pages += best.normal.length + best.zero.length;
        if (!this.push(this.toRun(best))) this.blocked = true;
      }
    }
    return moved;
  }

  /** Where a packet's first page lies, for the merge: -1 for one without pages (a SYNC). */
  private addressKey(p: MultifdPacketRecord): number {
    const first = p.normal.length > 0 ? p.normal[0] : p.zero.length > 0 ? p.zero[0] : -1;
    if (first < 0) return -1;
    return (this.blocks?.get(p.block)?.index ?? 0) * 2 ** 42 + first;
  }

  /** The waiting main record, if the ordering rule lets it go; true if it went. */
  private passMain(): boolean {
    const rec = this.mainRecord!;
    if (rec.type === 'ram-mem-size') {
      this.blocks = new Map(rec.blocks.map((b) => [b.id, b]));
      for (const ch of this.channels) if (ch.parser === null) this.startChannel(ch);
    } else if (rec.type === 'configuration' && rec.pageSize !== undefined) {
      this.pageSize = rec.pageSize;
    } else if (rec.type === 'ram-eos' || rec.type === 'ram-multifd-flush') {
      this.mark ??= rec.type;
      if (rec.type === this.mark && !this.synced()) return false;
      if (rec.type === this.mark) this.epoch++;
    }
    this.mainRecord = null;
    this.mainOffset = rec.offset;
    const done = this.mainDone!;
    this.mainDone = null;
    // MULTIFD_FLUSH only orders the channels, done here: a single-channel
    // stream has none, and the image must not depend on the channel count
    // (the setup section's one would otherwise land in the stored leader).
    if (rec.type !== 'ram-multifd-flush' && !this.push(rec)) this.blocked = true;
    done(null);
    return true;
  }

  /** Every channel delivered its SYNC for the mark the main stream is at; throws if one never can. */
  private synced(): boolean {
    let all = this.channels.length === this.expected;
    for (const ch of this.channels) {
      if (ch.syncs > this.epoch) continue;
      all = false;
      if (ch.drained && ch.head === null) {
        throw new MultifdMergeError(`multifd channel ${ch.id < 0 ? `#${this.channels.indexOf(ch) + 1}` : ch.id} closed before sync point ${this.epoch + 1} (${ch.syncs} SYNC packets of the main stream's ${this.epoch + 1})`);
      }
    }
    return all;
  }

  /** A packet's pages as one page run: data pages first, then zero pages (fill 0). */
  private toRun(p: MultifdPacketRecord): RamPageRunRecord {
    const block = this.blocks?.get(p.block);
    if (block === undefined) throw new MultifdMergeError(`multifd channel ${p.channel}: RAM block "${p.block}" was never announced`);
    const count = p.normal.length + p.zero.length;
    const addresses = new Float64Array(count);
    const dataAt = new Int32Array(count);
    for (let i = 0; i < p.normal.length; i++) {
      addresses[i] = p.normal[i];
      dataAt[i] = i * this.pageSize;
    }
    for (let i = 0; i < p.zero.length; i++) {
      addresses[p.normal.length + i] = p.zero[i];
      dataAt[p.normal.length + i] = -1;
    }
    return { type: 'ram-page-run', offset: this.mainOffset, block, count, addresses, dataAt, source: p.data, continued: true, byteLength: p.data.length + 64 };
  }
}
