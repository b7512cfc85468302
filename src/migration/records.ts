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

/**
 * RAM_SAVE_FLAG_XBZRLE: a delta against the last version of the page that
 * was sent (the xbzrle capability). `delta` is the run-length data after
 * the u8 encoding flag and the be16 length (checked by the framer).
 */
export interface RamXbzrleRecord {
  type: 'ram-xbzrle';
  offset: number;
  block: RamBlockInfo;
  address: number;
  /** A view into the input chunk unless it straddled chunks. */
  delta: Buffer;
  continued: boolean;
}

/**
 * RAM_SAVE_FLAG_COMPRESS_PAGE (QEMU ≤ 9.0, the compress capability): one
 * page deflated with zlib (qemu_put_compression_data: be32 length, then a
 * zlib stream). `data` is the zlib stream.
 */
export interface RamCompressedRecord {
  type: 'ram-compressed';
  offset: number;
  block: RamBlockInfo;
  address: number;
  data: Buffer;
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
  | RamXbzrleRecord
  | RamCompressedRecord
  | RamEosRecord
  | RamMultifdFlushRecord
  | DeviceStateRecord
  | EofRecord
  | VmDescriptionRecord;

export type MigrationRecordType = MigrationRecord['type'];

/**
 * Consecutive PAGE and ZERO records of one block whose bytes all lie in one
 * input chunk: what MigrationFramer emits instead of single page records
 * when asked for page runs. One object per run instead of one per page is
 * what lets a consumer keep up with a pipe (a 1 GiB stream has 500k pages).
 * `expandPageRun` turns it back into the single records it stands for.
 */
export interface RamPageRunRecord {
  type: 'ram-page-run';
  /** Stream offset of the first record. */
  offset: number;
  block: RamBlockInfo;
  count: number;
  /** Byte address within the block of each record's page. */
  addresses: Float64Array;
  /** Where each PAGE's data starts in `source`; for a ZERO record, -1 - fill byte. */
  dataAt: Int32Array;
  /** The input chunk the records lie in. */
  source: Buffer;
  /** The first record had CONTINUE; every later one has it (else it would start a new run). */
  continued: boolean;
  /** Stream bytes the run covers. */
  byteLength: number;
}

/** What a framer with page runs enabled emits. */
export type FramedRecord = MigrationRecord | RamPageRunRecord;

/** Where the framer's parts push the records they read (the framer's readable side). */
export interface RecordSink {
  push(record: FramedRecord | null): boolean;
}

/** The single PAGE/ZERO records a run stands for, in stream order (for tests and tools). */
export function expandPageRun(run: RamPageRunRecord, pageSize: number): Array<RamPageRecord | RamZeroRecord> {
  const out: Array<RamPageRecord | RamZeroRecord> = [];
  let offset = run.offset;
  for (let i = 0; i < run.count; i++) {
    const continued = i > 0 || run.continued;
    const header = continued ? 8 : 9 + Buffer.byteLength(run.block.id, 'latin1');
    const at = run.dataAt[i];
    if (at >= 0) {
      out.push({ type: 'ram-page', offset, block: run.block, address: run.addresses[i], data: run.source.subarray(at, at + pageSize), continued });
      offset += header + pageSize;
    } else {
      out.push({ type: 'ram-zero', offset, block: run.block, address: run.addresses[i], fill: -1 - at, continued });
      offset += header + 1;
    }
  }
  return out;
}
