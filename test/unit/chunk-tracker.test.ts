import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as zlib from 'node:zlib';
import { ChunkTracker } from '../../src/snapshot/chunk-tracker';
import { DIGEST_CHUNK_SIZE } from '../../src/snapshot/digests';
import { prng } from '../helpers';

const CS = DIGEST_CHUNK_SIZE;

/** A disk in memory: what the tracker reads back for dirty chunks. */
function disk(size: number) {
  const bytes = Buffer.alloc(size);
  let reads = 0;
  return {
    bytes,
    get reads() {
      return reads;
    },
    read: async (offset: number, length: number) => {
      reads++;
      return Buffer.from(bytes.subarray(offset, offset + length));
    },
  };
}

function expected(bytes: Buffer): number[] {
  const out: number[] = [];
  for (let o = 0; o < bytes.length; o += CS) out.push(zlib.crc32(bytes.subarray(o, Math.min(bytes.length, o + CS))));
  return out;
}

test('in-order writes with holes: every chunk digested from the writes alone', async () => {
  const size = 5 * CS + 12288; // a short last chunk
  const d = disk(size);
  const t = new ChunkTracker(d, size);
  const rnd = prng(7);
  for (let off = 0; off < size; ) {
    const len = Math.min(size - off, 4096 * (1 + Math.floor(rnd() * 40)));
    if (rnd() < 0.6) {
      const piece = Buffer.alloc(len);
      for (let i = 0; i < len; i += 512) piece[i] = 1 + Math.floor(rnd() * 255);
      piece.copy(d.bytes, off);
      // split across two buffers, as a writev would
      const cut = Math.floor(len / 2);
      t.write(off, [piece.subarray(0, cut), piece.subarray(cut)]);
    }
    off += len + (rnd() < 0.3 ? 4096 * Math.floor(rnd() * 300) : 0);
  }
  assert.equal(Array.from(await t.finish()), expected(d.bytes));
  assert.is(t.dirtyChunks, 0);
  assert.is(d.reads, 0, 'nothing read back');
});

test('a write behind an earlier one (a re-sent page) makes its chunk dirty: read back, still right', async () => {
  const size = 3 * CS;
  const d = disk(size);
  const t = new ChunkTracker(d, size);
  const put = (off: number, fill: number, len = 4096) => {
    const b = Buffer.alloc(len, fill);
    b.copy(d.bytes, off);
    t.write(off, [b]);
  };
  put(0, 1, 65536);
  put(CS + 8192, 2);
  put(CS + 4096, 3); // behind: chunk 1 dirty
  put(2 * CS, 4);
  put(2 * CS + 4096, 5);
  put(CS + 65536, 6); // more writes to a dirty chunk
  assert.equal(Array.from(await t.finish()), expected(d.bytes));
  assert.is(t.dirtyChunks, 1);
  assert.is(d.reads, 1);
});

test('untouched chunks get the CRC of zeros', async () => {
  const size = 2 * CS;
  const d = disk(size);
  const t = new ChunkTracker(d, size);
  assert.equal(Array.from(await t.finish()), expected(d.bytes));
});

test.run();
