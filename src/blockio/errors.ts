import { QemuSnapError } from '../errors';

function describe(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * A BlockWrite that cannot be a contiguous range: negative or fractional
 * offset, or buffers whose lengths do not add up to `length`.
 */
export class InvalidBlockWriteError extends QemuSnapError {
  constructor(readonly offset: number, readonly length: number, readonly seq: number, why: string) {
    super(`block write #${seq} at offset ${offset} (${length} bytes) is invalid: ${why}`);
  }
}

/**
 * The target failed a write. Errors that are already QemuSnapErrors (the
 * image engine's own, which name their cluster) are passed through
 * unwrapped; anything else (EIO, ENOSPC) is wrapped so the message says
 * which range was being written.
 */
export class BlockWriteError extends QemuSnapError {
  constructor(readonly offset: number, readonly length: number, readonly seq: number, override readonly cause: unknown) {
    super(`block write #${seq} at offset ${offset} (${length} bytes) failed: ${describe(cause)}`);
  }
}

/** The source failed a read, or returned a buffer of the wrong size. */
export class BlockReadError extends QemuSnapError {
  constructor(readonly offset: number, readonly length: number, override readonly cause: unknown) {
    super(`block read at offset ${offset} (${length} bytes) failed: ${describe(cause)}`);
  }
}

/** A plan entry or urgent request that is not a readable range. */
export class InvalidBlockReadError extends QemuSnapError {
  constructor(readonly offset: number, readonly length: number, why: string) {
    super(`block read at offset ${offset} (${length} bytes) is invalid: ${why}`);
  }
}

/** urgent() was called after the reader had already ended. */
export class BlockReaderEndedError extends QemuSnapError {
  constructor(readonly offset: number) {
    super(`urgent block read at offset ${offset} requested after the reader ended`);
  }
}

export function wrapWriteError(err: unknown, offset: number, length: number, seq: number): Error {
  return err instanceof QemuSnapError ? err : new BlockWriteError(offset, length, seq, err);
}

export function wrapReadError(err: unknown, offset: number, length: number): Error {
  return err instanceof QemuSnapError ? err : new BlockReadError(offset, length, err);
}
