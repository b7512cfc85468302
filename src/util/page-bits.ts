// One bit per page of a RAM block, allocated in slabs as pages are touched.
// A block's length comes from the stream or the image (MEM_SIZE may claim
// 16 TiB, 2^35 pages of 512 bytes): a flat bitmap of that size would be
// 4 GiB before a single page arrived.

/** Pages per slab: 2^18 bits, a 32 KiB slab. */
const SLAB_PAGES = 1 << 18;

export class PageBits {
  private readonly slabs: (Uint8Array | undefined)[];

  constructor(readonly pages: number) {
    this.slabs = new Array<Uint8Array | undefined>(Math.ceil(pages / SLAB_PAGES));
  }

  /** Bytes the bitmap would take flat (bit i of byte i>>3, LSB first). */
  get length(): number {
    return Math.ceil(this.pages / 8);
  }

  has(page: number): boolean {
    const s = this.slabs[Math.floor(page / SLAB_PAGES)];
    if (!s) return false;
    const i = page % SLAB_PAGES;
    return (s[i >>> 3] & (1 << (i & 7))) !== 0;
  }

  /** Sets the page's bit; true when it was clear. */
  add(page: number): boolean {
    const si = Math.floor(page / SLAB_PAGES);
    const s = (this.slabs[si] ??= new Uint8Array(SLAB_PAGES / 8));
    const i = page % SLAB_PAGES;
    const bit = 1 << (i & 7);
    if ((s[i >>> 3] & bit) !== 0) return false;
    s[i >>> 3] |= bit;
    return true;
  }

  /** Clears the page's bit; true when it was set. */
  delete(page: number): boolean {
    const s = this.slabs[Math.floor(page / SLAB_PAGES)];
    if (!s) return false;
    const i = page % SLAB_PAGES;
    const bit = 1 << (i & 7);
    if ((s[i >>> 3] & bit) === 0) return false;
    s[i >>> 3] &= ~bit;
    return true;
  }

  /** Byte `index` of the flat bitmap (0 where no slab was made). */
  byteAt(index: number): number {
    const s = this.slabs[Math.floor(index / (SLAB_PAGES / 8))];
    return s ? s[index % (SLAB_PAGES / 8)] : 0;
  }
}
