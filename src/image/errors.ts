import { QemuSnapError } from '../errors';

/**
 * Anything wrong with a QCOW2 image or a request made to it. `offset` is a
 * byte offset in the image file when the problem sits at a known place
 * (a table, an entry, a cluster), otherwise undefined.
 */
export class Qcow2Error extends QemuSnapError {
  readonly path: string;
  readonly offset?: number;

  constructor(path: string, reason: string, offset?: number) {
    super(offset === undefined ? `${path}: ${reason}` : `${path}: ${reason} (at byte offset ${offset})`);
    this.path = path;
    if (offset !== undefined) this.offset = offset;
  }
}
