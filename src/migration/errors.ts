import { QemuSnapError } from '../errors';

/**
 * A migration stream that does not follow QEMU's format (or uses a part of it
 * we cannot handle). `offset` is the byte offset in the stream where the
 * offending item starts.
 */
export class StreamFormatError extends QemuSnapError {
  readonly offset: number;
  readonly section: string | undefined;

  constructor(offset: number, what: string, section?: string) {
    super(`bad stream at byte ${offset}: ${what}${section === undefined ? '' : ` in section ${section}`}`);
    this.offset = offset;
    this.section = section;
  }
}
