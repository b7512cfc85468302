// --aio=native and --aio=io_uring: Linux AIO (io_submit/io_getevents) or
// io_uring through the native module, as QEMU's aio=native and io_uring.
// Linux AIO is only asynchronous for O_DIRECT files, and this engine serves
// DirectFile alone (with either kind).
//
// At most maxInFlight requests are in the kernel at once (submitted and not
// yet reaped): that is --max-in-flight, counted where it is real. Requests
// beyond it wait here, first come first served, and go as earlier ones
// complete. Completions arrive on the main loop (an eventfd that libuv
// polls), one callback each.
import { constants as osConstants } from 'node:os';
import type { NativeModule } from './native';

/** Native engine handle (opaque). */
type AioHandle = object;

interface AioRequest {
  write: boolean;
  fd: number;
  position: number;
  /** Kept here until completion: the kernel reads or writes their memory. */
  buffers: Buffer[];
  resolve(bytes: number): void;
  reject(err: Error): void;
}

/** The kernel interface: Linux AIO (QEMU's aio=native) or io_uring. */
export type KernelAioKind = 'native' | 'io_uring';

export interface LinuxAioStats {
  /** Requests in the kernel now. */
  inFlight: number;
  /** Most requests ever in the kernel at once. */
  peak: number;
  /** Requests submitted in all. */
  submitted: number;
  /** Requests waiting for a free slot now. */
  queued: number;
}

/** errno number → name (EIO, ENOSPC...), as Node's own errors carry it in `code`. */
const ERRNO_NAMES = new Map<number, string>(Object.entries(osConstants.errno).map(([name, n]) => [n, name]));

function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
}

export class LinuxAio {
  private readonly handle: AioHandle;
  private readonly pending = new Map<number, AioRequest>();
  private readonly waiting: AioRequest[] = [];
  private waitingHead = 0;
  private nextTag = 1;
  private destroyed = false;

  constructor(private readonly mod: NativeModule, readonly maxInFlight: number, readonly kind: KernelAioKind = 'native') {
    if (!mod.aioCreate) throw new Error('the native module has no Linux AIO or io_uring engine (rebuild it: npm run build:native)');
    this.handle = mod.aioCreate(maxInFlight, (tag, result) => this.complete(tag, result), kind === 'io_uring' ? 1 : 0);
  }

  /** For messages. */
  get name(): string {
    return this.kind === 'native' ? 'Linux AIO' : 'io_uring';
  }

  /** pwritev(2) through the kernel's AIO; resolves to the bytes written. */
  pwritev(fd: number, buffers: Buffer[], position: number): Promise<number> {
    return this.enqueue(true, fd, buffers, position);
  }

  /** preadv(2) through the kernel's AIO; resolves to the bytes read (short at the end of the file). */
  preadv(fd: number, buffers: Buffer[], position: number): Promise<number> {
    return this.enqueue(false, fd, buffers, position);
  }

  stats(): LinuxAioStats {
    const [inFlight, peak, submitted] = (this.mod.aioStats as NonNullable<NativeModule['aioStats']>)(this.handle);
    return { inFlight, peak, submitted, queued: this.waiting.length - this.waitingHead };
  }

  /**
   * Waits for the requests still in the kernel (their memory is then free),
   * fails those still waiting here, and releases the AIO context.
   */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    (this.mod.aioDestroy as NonNullable<NativeModule['aioDestroy']>)(this.handle);
    const err = Object.assign(new Error(`${this.name} engine closed`), { code: 'ECANCELED' });
    for (const r of this.pending.values()) r.reject(err);
    this.pending.clear();
    for (let i = this.waitingHead; i < this.waiting.length; i++) this.waiting[i].reject(err);
    this.waiting.length = 0;
    this.waitingHead = 0;
  }

  private enqueue(write: boolean, fd: number, buffers: Buffer[], position: number): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      if (this.destroyed) return reject(Object.assign(new Error(`${this.name} engine closed`), { code: 'EBADF' }));
      const r: AioRequest = { write, fd, position, buffers, resolve, reject };
      // First come first served: nothing overtakes a request already waiting.
      if (this.waitingHead < this.waiting.length || !this.submit(r)) this.waiting.push(r);
    });
  }

  /** False when maxInFlight requests are in the kernel already. */
  private submit(r: AioRequest): boolean {
    const tag = this.nextTag++;
    let now: boolean;
    try {
      now = (this.mod.aioSubmit as NonNullable<NativeModule['aioSubmit']>)(this.handle, r.write, r.fd, r.position, r.buffers, tag);
    } catch (err) {
      r.reject(err as Error);
      return true;
    }
    if (now) this.pending.set(tag, r);
    return now;
  }

  private complete(tag: number, result: number): void {
    const r = this.pending.get(tag);
    if (r === undefined) return;
    this.pending.delete(tag);
    if (result < 0) {
      const code = errnoName(-result);
      r.reject(Object.assign(new Error(`${this.name} ${r.write ? 'write' : 'read'} at ${r.position}: ${code}`), { code, errno: result }));
    } else r.resolve(result);
    while (this.waitingHead < this.waiting.length) {
      if (!this.submit(this.waiting[this.waitingHead])) break;
      this.waitingHead++;
    }
    if (this.waitingHead > 64 && this.waitingHead * 2 > this.waiting.length) {
      this.waiting.splice(0, this.waitingHead);
      this.waitingHead = 0;
    }
  }
}
