// Read-only views of a file through mmap(2), one window at a time.
//
// A view hands the file's page-cache pages to whoever consumes them (load
// gives them to write(2)) without the copy a pread(2) makes into a buffer
// of ours: on the bench VM, 1 GiB into a pipe took 0.45 CPU-s with pread
// and 0.33 with views. Needs the native module; the caller falls back to
// reads without it.
//
// Only for files nobody truncates while they are mapped: touching a page
// past the end of the file raises SIGBUS, which kills the process.
import type { NativeModule } from '../util/native';

/** Windows are this large and aligned to it (a range across two gets a window of its own). */
const WINDOW_BYTES = 16 << 20;

export class MappedFile {
  private window: Buffer | null = null;
  private windowStart = 0;
  /** mmap failed once (a file system without it, no address space): views are off. */
  private failed = false;

  /**
   * @param size the file's size: views never reach past it
   */
  constructor(
    private readonly mod: NativeModule,
    private readonly fd: number,
    private readonly size: number,
  ) {}

  /** Bytes [offset, offset+length) of the file, or null when they are not all inside it or mmap fails. */
  view(offset: number, length: number): Buffer | null {
    if (this.failed || offset < 0 || length <= 0 || offset + length > this.size) return null;
    const w = this.window;
    if (w === null || offset < this.windowStart || offset + length > this.windowStart + w.length) {
      if (!this.remap(offset, length)) return null;
    }
    const at = offset - this.windowStart;
    return (this.window as Buffer).subarray(at, at + length);
  }

  private remap(offset: number, length: number): boolean {
    const start = offset - (offset % WINDOW_BYTES);
    const end = Math.min(this.size, Math.max(start + WINDOW_BYTES, offset + length));
    // The old window is unmapped only when collected: drop its pages from
    // our resident set now, or it would grow by a window each time. Per
    // window, not per view: each drop is a TLB shoot-down across CPUs
    // (28 µs apiece on the bench VM, 33 ms per GiB when done per MiB).
    if (this.window) this.mod.dropPages(this.window);
    this.window = null;
    try {
      this.window = this.mod.mapFile(this.fd, start, end - start);
    } catch {
      this.failed = true;
      return false;
    }
    this.windowStart = start;
    return true;
  }
}
