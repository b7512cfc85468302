import { Readable } from 'streamx';

/**
 * Bytes from a Node readable (stdin, a socket) as a streamx Readable that the
 * owner can end early. A source with a return path never closes its side
 * before it hears SHUT from us, so `save` has to decide from the data that
 * the stream is complete and end its own input.
 */
export class InputGate extends Readable {
  bytes = 0;
  lastDataAt = Date.now();
  private ended = false;

  /**
   * @param onChunk sees every chunk as it passes, with the stream offset
   *   just past it (save hands chunks back to the reader from there).
   */
  constructor(
    private readonly source: NodeJS.ReadableStream,
    private readonly onChunk?: (chunk: Buffer, end: number) => void,
  ) {
    super({ highWaterMark: 4 << 20 });
    source.on('data', this.onData);
    source.on('end', this.onEnd);
    source.on('error', this.onError);
  }

  /** Ends the stream now; later input from the source is ignored. */
  finish(): void {
    if (this.ended) return;
    this.ended = true;
    this.detach();
    this.push(null);
  }

  override _read(cb: (err: Error | null) => void): void {
    this.source.resume();
    cb(null);
  }

  override _destroy(cb: (err: Error | null) => void): void {
    this.detach();
    cb(null);
  }

  private readonly onData = (chunk: Buffer | string): void => {
    const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    this.bytes += buf.length;
    this.lastDataAt = Date.now();
    this.onChunk?.(buf, this.bytes);
    if (!this.push(buf)) this.source.pause();
  };

  private readonly onEnd = (): void => {
    this.finish();
  };

  private readonly onError = (err: Error): void => {
    this.destroy(err);
  };

  private detach(): void {
    this.source.removeListener('data', this.onData);
    this.source.removeListener('end', this.onEnd);
    this.source.removeListener('error', this.onError);
  }
}
