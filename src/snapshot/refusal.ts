// What `load` owes a consumer when it refuses an image before streaming.
//
// A destination QEMU that gets an empty incoming stream does not fail: QEMU
// 7.2 and 10.0 both stay in `inmigrate` for ever (`-incoming exec:true`
// does the same). So instead of nothing, a consumer on a pipe or a socket
// gets this one line of text. Its first four bytes, "qemu" (0x71656d75),
// are not QEMU_VM_FILE_MAGIC ("QEVM", 0x5145564d): qemu_loadvm_state (7.2;
// qemu_loadvm_state_header in 10.0) reads the magic first and stops with
// "Not a migration stream", then "load of migration failed: Invalid
// argument", and the process exits 1 at once. Nothing past the magic is
// read, so nothing in it can ever load as a VM. A person or a script
// reading the consumer's end sees a sentence instead of binary.
export const REFUSAL_NOTICE = Buffer.from("qemu-snap: refused the image, this is not a migration stream (qemu-snap's stderr says why)\n");

/** True when `data` is the refusal notice and nothing else. */
export function isRefusalNotice(data: Buffer): boolean {
  return data.equals(REFUSAL_NOTICE);
}
