// XBZRLE page deltas as QEMU's migration/xbzrle.c writes them and
// migration/ram.c sends them: a RAM record with RAM_SAVE_FLAG_XBZRLE, then
// u8 ENCODING_FLAG_XBZRLE, be16 length and that many bytes of
//
//   delta = (zrun nzrun)*      zrun: bytes left as they are (uleb128)
//                              nzrun: count (uleb128, not 0) + new bytes
//
// where every uleb128 is QEMU's "small" form (uleb128_decode_small in
// util/cutils.c: one or two bytes, at most 14 bits). The delta applies to the
// destination's copy of the page, i.e. the last version of it that was sent.

/** ENCODING_FLAG_XBZRLE (ram.c): the only encoding a delta may carry. */
export const ENCODING_FLAG_XBZRLE = 0x01;

/** Why a delta does not decode, and where in the delta (0-based byte). */
export class XbzrleDecodeError extends Error {
  constructor(readonly deltaOffset: number, readonly reason: string) {
    super(`${reason} at byte ${deltaOffset} of the delta`);
  }
}

/** uleb128_decode_small: value and bytes used, or -1 for a third byte. */
function uleb128Small(src: Buffer, at: number, end: number, what: string): [number, number] {
  const b0 = src[at];
  if ((b0 & 0x80) === 0) return [b0, 1];
  if (at + 1 >= end) throw new XbzrleDecodeError(at, `truncated ${what} length`);
  const b1 = src[at + 1];
  if ((b1 & 0x80) !== 0) throw new XbzrleDecodeError(at, `${what} length longer than 14 bits`);
  return [(b0 & 0x7f) | (b1 << 7), 2];
}

/**
 * Applies `delta` (src[start, end)) to `page` in place, with the checks of
 * QEMU's xbzrle_decode_buffer: each run needs two bytes left, zruns after
 * the first and all nzruns are non-empty, and nothing may run past the page
 * or the delta. Throws XbzrleDecodeError; the page may then be half-patched.
 */
export function applyXbzrle(page: Buffer, src: Buffer, start: number, end: number): void {
  const dlen = page.length;
  let i = start;
  let d = 0;
  while (i < end) {
    if (end - i < 2) throw new XbzrleDecodeError(i - start, 'truncated run (a zero run needs a non-zero run after it)');
    const [zrun, zn] = uleb128Small(src, i, end, 'zero-run');
    if (i !== start && zrun === 0) throw new XbzrleDecodeError(i - start, 'empty zero run');
    i += zn;
    d += zrun;
    if (d > dlen) throw new XbzrleDecodeError(i - start - zn, `zero run of ${zrun} bytes goes past the end of the ${dlen}-byte page`);
    if (end - i < 2) throw new XbzrleDecodeError(i - start, 'truncated run (a non-zero run needs its length and at least one byte)');
    const [count, cn] = uleb128Small(src, i, end, 'non-zero-run');
    if (count === 0) throw new XbzrleDecodeError(i - start, 'empty non-zero run');
    i += cn;
    if (d + count > dlen) throw new XbzrleDecodeError(i - start - cn, `non-zero run of ${count} bytes goes past the end of the ${dlen}-byte page`);
    if (i + count > end) throw new XbzrleDecodeError(i - start - cn, `non-zero run of ${count} bytes is longer than the ${end - i} bytes left in the delta`);
    src.copy(page, d, i, i + count);
    d += count;
    i += count;
  }
}

/** uleb128_encode_small (for tests and tools): 1 or 2 bytes, n < 2^14. */
function uleb128EncodeSmall(n: number, out: number[]): void {
  if (n < 0x80) out.push(n);
  else out.push((n & 0x7f) | 0x80, n >>> 7);
}

/**
 * A delta in QEMU's format for old → new (same length), byte-exact runs
 * (QEMU's encoder works a word at a time, so its non-zero runs may hold
 * equal bytes; both decode the same), or null when it would not fit `limit`
 * bytes (QEMU then sends the page whole). For tests and tools.
 */
export function encodeXbzrle(oldPage: Buffer, newPage: Buffer, limit = newPage.length): Buffer | null {
  const out: number[] = [];
  const n = newPage.length;
  let i = 0;
  while (i < n) {
    let z = 0;
    while (i + z < n && oldPage[i + z] === newPage[i + z]) z++;
    if (i + z === n) break;
    let nz = 0;
    while (i + z + nz < n && oldPage[i + z + nz] !== newPage[i + z + nz]) nz++;
    uleb128EncodeSmall(z, out);
    uleb128EncodeSmall(nz, out);
    for (let k = 0; k < nz; k++) out.push(newPage[i + z + k]);
    if (out.length > limit) return null;
    i += z + nz;
  }
  return Buffer.from(out);
}
