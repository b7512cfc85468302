// Typed records of a QEMU migration stream (version 3). The framer produces
// them from bytes; the encoder turns them back into the identical bytes.

/** One RAM block as announced by the MEM_SIZE record of the `ram` section. */
export interface RamBlockInfo {
  /** idstr, e.g. "pc.ram" (bytes kept 1:1 through latin1). */
  id: string;
  /** used_length in bytes. */
  length: number;
  /** Position in the MEM_SIZE list (0-based). */
  index: number;
  /**
   * Host page size of the block; present only when the source sends it
   * (postcopy-ram enabled and the block's page size differs from the host's).
   */
  pageSize?: number;
  /** Guest physical address of the block's region; present only with x-ignore-shared. */
  mrAddr?: number;
}

/** One subsection of the CONFIGURATION record. */
export type ConfigurationSubsection =
  | { name: 'configuration/target-page-bits'; versionId: number; targetPageBits: number }
  | { name: 'configuration/capabilities'; versionId: number; capabilities: string[] }
  | { name: 'configuration/uuid'; versionId: number; uuid: string };

export interface HeaderRecord {
  type: 'header';
  offset: number;
  version: number;
}

export interface ConfigurationRecord {
  type: 'configuration';
  offset: number;
  machine: string;
  subsections: ConfigurationSubsection[];
  /** Target page size, when a target-page-bits subsection is present. */
  pageSize?: number;
  /** The bytes after the CONFIGURATION token, verbatim. */
  raw: Buffer;
}

export interface CommandRecord {
  type: 'command';
  offset: number;
  command: number;
  name: string;
  payload: Buffer;
}

export interface SectionStartRecord {
  type: 'section-start' | 'section-full';
  offset: number;
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
}

export interface SectionPartRecord {
  type: 'section-part' | 'section-end';
  offset: number;
  sectionId: number;
  /** Resolved from the section's START. */
  idstr: string;
}

export interface SectionFooterRecord {
  type: 'section-footer';
  offset: number;
  sectionId: number;
}

export interface RamMemSizeRecord {
  type: 'ram-mem-size';
  offset: number;
  totalBytes: number;
  blocks: RamBlockInfo[];
}

export interface RamPageRecord {
  type: 'ram-page';
  offset: number;
  block: RamBlockInfo;
  /** Byte address of the page within its block. */
  address: number;
  /** One target page; a view into the input chunk unless it straddled chunks. */
  data: Buffer;
  /** Sent with RAM_SAVE_FLAG_CONTINUE (no idstr on the wire). */
  continued: boolean;
}

export interface RamZeroRecord {
  type: 'ram-zero';
  offset: number;
  block: RamBlockInfo;
  address: number;
  /** The fill byte (0 in every QEMU that exists). */
  fill: number;
  continued: boolean;
}

export interface RamEosRecord {
  type: 'ram-eos';
  offset: number;
}

export interface RamMultifdFlushRecord {
  type: 'ram-multifd-flush';
  offset: number;
}

/** Opaque device state, from the first device SECTION_FULL token to the last footer. */
export interface DeviceStateRecord {
  type: 'device-state';
  offset: number;
  data: Buffer;
}

export interface EofRecord {
  type: 'eof';
  offset: number;
}

export interface VmDescriptionRecord {
  type: 'vmdescription';
  offset: number;
  /** The JSON document, parsed. */
  json: unknown;
  /** The JSON bytes exactly as sent (without token and length). */
  raw: Buffer;
}

export type MigrationRecord =
  | HeaderRecord
  | ConfigurationRecord
  | CommandRecord
  | SectionStartRecord
  | SectionPartRecord
  | SectionFooterRecord
  | RamMemSizeRecord
  | RamPageRecord
  | RamZeroRecord
  | RamEosRecord
  | RamMultifdFlushRecord
  | DeviceStateRecord
  | EofRecord
  | VmDescriptionRecord;

export type MigrationRecordType = MigrationRecord['type'];
