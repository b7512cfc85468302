import { RamFlag } from './constants';
import { StreamFormatError } from './errors';
import { ENCODING_FLAG_XBZRLE } from './xbzrle';
import { printable } from '../util/text';
import type { ChunkQueue } from './chunk-queue';
import type { RamBlockInfo, RecordSink } from './records';

const EMPTY = Buffer.alloc(0);
const TWO32 = 4294967296;
const MAX_RAM_TOTAL = 16 * 1024 ** 4;
const MAX_RAM_BLOCKS = 1000;
/** Most records in one page run. */
const PAGE_RUN_MAX = 1024;
const KNOWN_RAM_FLAGS =
  RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE |
  RamFlag.XBZRLE | RamFlag.HOOK | RamFlag.COMPRESS_PAGE | RamFlag.MULTIFD_FLUSH;

/**
 * The body of section ram (ram_load_precopy in ram.c): page records by
 * their flags (PAGE, ZERO, XBZRLE, COMPRESS_PAGE), the RAM blocks that
 * MEM_SIZE announces and the idstrs that name them, up to EOS. Reads from
 * the framer's queue and pushes records to the framer; the framer owns the
 * section headers and footers around it.
 */
export class RamRecordParser {
  /** Target page size and its mask: the framer sets them from the stream's configuration. */
  pageSize: number;
  mask: number;
  /** x-ignore-shared is on: a lone MEM_SIZE extra is the block's GPA. */
  ignoreShared = false;
  /** Inside the START section of ram, where MEM_SIZE belongs. */
  inRamStart = false;
  memSizeSeen = false;
  /** RAM blocks announced so far by MEM_SIZE. */
  blocks: RamBlockInfo[] = [];
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

  constructor(
    private readonly q: ChunkQueue,
    private readonly out: RecordSink,
    pageSize: number,
    pageRuns: boolean,
  ) {
    this.pageSize = pageSize;
    this.mask = pageSize - 1;
    this.pageRuns = pageRuns;
  }

  setPageSize(pageSize: number): void {
    this.pageSize = pageSize;
    this.mask = pageSize - 1;
  }

  private fail(offset: number, what: string, section?: string): never {
    throw new StreamFormatError(offset, what, section);
  }

  /** One pass over as many RAM records as are complete. Returns true when the body ended (EOS). */
  parse(): boolean {
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
          this.out.push({ type: 'ram-page', offset, block, address, data, continued });
        } else {
          const fill = q.byteAt(rel);
          q.skip(rel + 1);
          this.lastBlock = block;
          this.out.push({ type: 'ram-zero', offset, block, address, fill, continued });
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
          this.out.push({ type: 'ram-eos', offset });
          return true;
        case RamFlag.MULTIFD_FLUSH:
          q.skip(8);
          this.out.push({ type: 'ram-multifd-flush', offset });
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
    this.out.push({ type: 'ram-compressed', offset, block, address, data, continued: (flags & RamFlag.CONTINUE) !== 0 });
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
    this.out.push({ type: 'ram-xbzrle', offset, block, address, delta, continued });
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
    this.out.push({
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
    this.out.push({ type: 'ram-mem-size', offset, totalBytes, blocks });
    return true;
  }
}
