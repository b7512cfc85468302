/**
 * Base class of every error qemu-snap raises on purpose. The CLI prints
 * `qemu-snap: <message>` for these and exits 1; anything else is a bug and
 * is still reported on one line, but marked as internal.
 */
export class QemuSnapError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}
