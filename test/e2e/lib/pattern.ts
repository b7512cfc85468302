import * as crypto from 'node:crypto';
import * as fs from 'node:fs';

const CHUNK = 4 << 20;

/**
 * A keystream of AES-128-CTR keyed by the seed: deterministic, incompressible,
 * and runs at GB/s with AES-NI, which a JS xorshift does not for 1 GiB.
 * Call it repeatedly for consecutive bytes of the same pattern.
 */
export function patternStream(seed: number): (out: Buffer) => Buffer {
  const cipher = patternCipher(seed);
  let zeros = Buffer.alloc(0);
  return (out: Buffer) => {
    if (zeros.length < out.length) zeros = Buffer.alloc(out.length);
    const enc = cipher.update(zeros.subarray(0, out.length));
    enc.copy(out);
    return out;
  };
}

function patternCipher(seed: number): crypto.Cipher {
  const key = crypto.createHash('sha256').update(`qemu-snap-pattern:${seed}`).digest().subarray(0, 16);
  return crypto.createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
}

/** The first `size` bytes of pattern `seed`, in memory (for small patterns). */
export function patternBytes(size: number, seed: number): Buffer {
  return patternStream(seed)(Buffer.allocUnsafe(size));
}

/** Write `size` bytes of pattern `seed` to `file` (replacing it). */
export function makePattern(file: string, size: number, seed: number): void {
  const cipher = patternCipher(seed);
  const zeros = Buffer.alloc(Math.min(CHUNK, size));
  const fd = fs.openSync(file, 'w');
  try {
    for (let done = 0; done < size; ) {
      const n = Math.min(zeros.length, size - done);
      // cipher.update allocates its output anyway: write it as is rather than copy.
      const chunk = cipher.update(zeros.subarray(0, n));
      let off = 0;
      while (off < n) off += fs.writeSync(fd, chunk, off, n - off);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * First offset at which the two files differ, or -1 if they are identical.
 * A shorter file differs at its length.
 */
export function compareFiles(a: string, b: string): number {
  const first = diffRanges(a, b, 1, 0);
  return first.length > 0 ? first[0][0] : -1;
}

/**
 * Byte ranges [start, end) where two files differ, merging differences
 * closer than `gap` bytes; at most `limit` ranges. Where one file is
 * longer, its tail is one more range. For reporting
 * what differs (e.g. KVM rewriting the guest's kvmclock page on restore).
 */
export function diffRanges(a: string, b: string, limit = 16, gap = 64): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.allocUnsafe(CHUNK);
    const bb = Buffer.allocUnsafe(CHUNK);
    for (let pos = 0; ; ) {
      const na = readFull(fa, ba, pos);
      const nb = readFull(fb, bb, pos);
      const n = Math.min(na, nb);
      if (ba.compare(bb, 0, n, 0, n) !== 0) {
        for (let i = 0; i < n; i++) {
          if (ba[i] === bb[i]) continue;
          const last = out[out.length - 1];
          if (last && pos + i - last[1] < gap) last[1] = pos + i + 1;
          else if (out.length === limit) return out;
          else out.push([pos + i, pos + i + 1]);
        }
      }
      if (na !== nb) {
        out.push([pos + n, Math.max(fs.fstatSync(fa).size, fs.fstatSync(fb).size)]);
        return out;
      }
      if (na === 0) return out;
      pos += n;
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

/** Compare `size` bytes of `file` at `fileOffset` with a buffer; first differing index within the range, or -1. */
export function compareRange(file: string, fileOffset: number, expected: Buffer): number {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(Math.min(CHUNK, expected.length));
    for (let done = 0; done < expected.length; ) {
      const want = Math.min(buf.length, expected.length - done);
      const n = readFull(fd, buf.subarray(0, want), fileOffset + done);
      const exp = expected.subarray(done, done + n);
      if (buf.compare(exp, 0, n, 0, n) !== 0) {
        for (let i = 0; i < n; i++) if (buf[i] !== exp[i]) return done + i;
      }
      if (n < want) return done + n;
      done += n;
    }
    return -1;
  } finally {
    fs.closeSync(fd);
  }
}

function readFull(fd: number, buf: Buffer, pos: number): number {
  let got = 0;
  while (got < buf.length) {
    const n = fs.readSync(fd, buf, got, buf.length - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

/**
 * Where two RAM dumps differ outside 0xA0000-0xFFFFF (kvmvapic rewrites bytes
 * there on every incoming migration), as "0xS..0xE" ranges, or null.
 */
export function differsOutsideBios(a: string, b: string): string | null {
  const ranges = diffRanges(a, b, 16, 0).filter(([s, e]) => e <= 0xa0000 || s >= 0x100000);
  return ranges.length ? ranges.map(([s, e]) => `0x${s.toString(16)}..0x${e.toString(16)}`).join(', ') : null;
}
