// Wire constants of QEMU's migration stream (version 3), as defined in
// QEMU's migration/savevm.c, migration/ram.c and migration/migration.c.

export const QEMU_VM_FILE_MAGIC = 0x5145564d; // "QEVM"
export const QEMU_VM_FILE_VERSION = 3;
export const QEMU_VM_FILE_VERSION_COMPAT = 2;

/** One-byte tokens at the top level of the stream. */
export const Token = {
  EOF: 0x00,
  SECTION_START: 0x01,
  SECTION_PART: 0x02,
  SECTION_END: 0x03,
  SECTION_FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  SECTION_FOOTER: 0x7e,
} as const;

/** Flags in the low bits of every RAM record's be64 header (ram.c). */
export const RamFlag = {
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
  MULTIFD_FLUSH: 0x200,
} as const;

/** MIG_CMD_* ids of QEMU_VM_COMMAND (savevm.c). */
export const Command = {
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  // Order of enum qemu_vm_cmd in savevm.c: ENABLE_COLO, POSTCOPY_RESUME,
  // RECV_BITMAP follow PACKAGED; SWITCHOVER_START was added in QEMU 10.0.
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
  SWITCHOVER_START: 11,
} as const;

/** MIG_RP_MSG_* ids of return-path messages, destination to source (migration.c). */
export const ReturnPathMessage = {
  INVALID: 0,
  SHUT: 1,
  PONG: 2,
  REQ_PAGES_ID: 3,
  REQ_PAGES: 4,
  RECV_BITMAP: 5,
  RESUME_ACK: 6,
  /** QEMU 8.1 and later only (switchover-ack capability). */
  SWITCHOVER_ACK: 7,
} as const;

export const DEFAULT_PAGE_SIZE = 4096;
