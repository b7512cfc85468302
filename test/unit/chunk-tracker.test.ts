import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ChunkTracker } from '../../src/snapshot/chunk-tracker';
import { ChunkHasher, createChunkHasher, DigestAlgorithm } from '../../src/snapshot/chunk-hash';
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

/** Each chunk digested whole, by a hasher of its own. */
async function expected(bytes: Buffer, algorithm: DigestAlgorithm): Promise<number[]> {
  const h = await createChunkHasher(algorithm);
  const out: number[] = [];
  for (let o = 0; o < bytes.length; o += CS) out.push(h.whole(bytes.subarray(o, Math.min(bytes.length, o + CS))));
  return out;
}

const ALGORITHMS: DigestAlgorithm[] = ['xxh64', 'crc32'];
const hashers = new Map<DigestAlgorithm, ChunkHasher>();
test.before(async () => {
  for (const a of ALGORITHMS) hashers.set(a, await createChunkHasher(a));
});

test('digest algorithms pinned by known answers: version 2 is the low 32 bits of XXH64 (seed 0), version 1 CRC-32', async () => {
  const x = hashers.get('xxh64') as ChunkHasher;
  assert.is(x.whole(Buffer.alloc(0)), 0x51d8e999, 'XXH64("") = 0xef46db3751d8e999');
  assert.is(x.whole(Buffer.from('abc')), 0xad770999, 'XXH64("abc") = 0x44bc2cf5ad770999');
  const c = hashers.get('crc32') as ChunkHasher;
  assert.is(c.whole(Buffer.from('123456789')), 0xcbf43926, 'the CRC-32 check value');
  // Fed in pieces and zeros: the same as whole.
  x.begin();
  x.update(Buffer.from('ab'));
  x.update(Buffer.from('c'));
  assert.is(x.end(), 0xad770999);
  x.begin();
  x.zeros(3 << 20);
  assert.is(x.end(), x.whole(Buffer.alloc(3 << 20)));
  assert.is(x.zeroChunk(3 << 20), x.whole(Buffer.alloc(3 << 20)));
});

test('in-order writes with holes: every chunk digested from the writes alone', async () => {
  for (const alg of ALGORITHMS) await inOrder(alg);
});

async function inOrder(alg: DigestAlgorithm): Promise<void> {
  const size = 5 * CS + 12288; // a short last chunk
  const d = disk(size);
  const t = new ChunkTracker(d, size, hashers.get(alg) as ChunkHasher);
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
  assert.equal(Array.from(await t.finish()), await expected(d.bytes, alg), alg);
  assert.is(t.dirtyChunks, 0);
  assert.is(d.reads, 0, 'nothing read back');
}

test('a write behind an earlier one, or into a finished chunk (a re-sent page), makes its chunk dirty: read back, still right', async () => {
  const size = 4 * CS;
  const d = disk(size);
  const t = new ChunkTracker(d, size, hashers.get('xxh64') as ChunkHasher);
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
  put(3 * CS, 7);
  put(2 * CS + 8192, 8); // chunk 2 was finished when the writes moved to chunk 3
  assert.equal(Array.from(await t.finish()), await expected(d.bytes, 'xxh64'));
  assert.is(t.dirtyChunks, 2);
  assert.is(d.reads, 2);
});

test('copySegments: runs copied from segments and digested in the same pass give the digests of write(), dirty chunks included', async () => {
  for (const alg of ALGORITHMS) {
    const size = 3 * CS;
    const d = disk(size);
    const t = new ChunkTracker(d, size, hashers.get(alg) as ChunkHasher);
    const rnd = prng(11);
    // Input chunks with 8-byte record headers between pages, as a stream has them.
    const input = [Buffer.alloc(64 * 4104), Buffer.alloc(64 * 4104)];
    for (const b of input) for (let i = 0; i < b.length; i += 97) b[i] = 1 + Math.floor(rnd() * 255);
    const run = (offset: number, pages: number, first: number) => {
      const segs = new Float64Array(pages * 3);
      for (let i = 0; i < pages; i++) {
        const p = first + i;
        segs.set([p >= 64 ? 1 : 0, (p % 64) * 4104 + 8, 4096], i * 3);
      }
      const into = Buffer.alloc(pages * 4096);
      t.copySegments(offset, pages * 4096, into, input, segs, pages);
      into.copy(d.bytes, offset);
      for (let i = 0; i < pages; i++) {
        const p = first + i;
        assert.ok(into.subarray(i * 4096, (i + 1) * 4096).equals(input[p >= 64 ? 1 : 0].subarray((p % 64) * 4104 + 8, (p % 64) * 4104 + 4104)), `page ${i} copied`);
      }
    };
    run(0, 16, 0);
    run(65536, 100, 10); // across both input buffers
    run(CS + 8192, 8, 3);
    run(CS, 2, 50); // behind: chunk 1 dirty, still copied
    run(2 * CS + 4096, 30, 90);
    assert.equal(Array.from(await t.finish()), await expected(d.bytes, alg), alg);
    assert.is(t.dirtyChunks, 1, alg);
  }
});

test('untouched chunks get the CRC of zeros', async () => {
  const size = 2 * CS;
  const d = disk(size);
  const t = new ChunkTracker(d, size, hashers.get('xxh64') as ChunkHasher);
  assert.equal(Array.from(await t.finish()), await expected(d.bytes, 'xxh64'));
});

test.run();
