// Opening a snapshot image for load, info and verify: the STVM header, the
// leader (parsed for the RAM block list) and the device state, all checked
// before anything is sent anywhere.
import { Readable } from 'streamx';
import { Qcow2Image } from '../image';
import { MigrationFramer } from '../migration/framer';
import type { ConfigurationRecord, MigrationRecord, RamBlockInfo, SectionStartRecord } from '../migration/records';
import * as zlib from 'node:zlib';
import { decodeDigestHeader, decodeDigestTable, DigestMismatchError, DigestTable, DIGEST_HEADER_SIZE } from './digests';
import { Token, RamFlag } from '../migration/constants';
import { decodeSnapshotHeader, layoutRamBlocks, RamBlockLayout, SnapshotFormatError, SnapshotHeader, VMSTATE_HEADER_SIZE } from './layout';

export interface SnapshotContents {
  path: string;
  image: Qcow2Image;
  header: SnapshotHeader;
  /** Stream bytes from the QEVM magic to the end of the RAM setup section. */
  leader: Buffer;
  /** Device state as saved: device sections, EOF and the optional VMDESCRIPTION. */
  deviceState: Buffer;
  /** The device sections alone (without EOF and VMDESCRIPTION), for a postcopy package. */
  deviceSections: Buffer;
  blocks: RamBlockLayout[];
  /** Block infos as in the stream (extra per-block fields included). */
  streamBlocks: RamBlockInfo[];
  ramSection: SectionStartRecord;
  configuration: ConfigurationRecord | null;
  vmdescription: unknown;
  virtualSize: number;
  /** RAM digests, when the image has the extension. */
  digests: DigestTable | null;
}

/** Largest leader + device state we agree to hold in memory. */
const MAX_STATE_BYTES = 256 << 20;

export async function openSnapshot(path: string): Promise<SnapshotContents> {
  const image = await Qcow2Image.open(path, { writable: false }).catch((err: unknown) => {
    throw namePath(err, path);
  });
  try {
    return await readContents(path, image);
  } catch (err) {
    await image.close().catch(() => undefined);
    throw err;
  }
}

/**
 * A system error from opening or reading `path` that does not say which
 * file (a read(2) on a directory: "illegal operation on a directory, read")
 * gets the path; a directory gets a sentence of its own.
 */
export function namePath(err: unknown, path: string): unknown {
  const e = err as NodeJS.ErrnoException;
  if (!e || typeof e.code !== 'string') return err;
  if (e.code === 'EISDIR') return new SnapshotFormatError(path, 'is a directory, not a snapshot image');
  if (e.path === undefined) e.path = path;
  return err;
}

async function readContents(path: string, image: Qcow2Image): Promise<SnapshotContents> {
  const head = await image.readVmState(0, VMSTATE_HEADER_SIZE);
  const header = decodeSnapshotHeader(path, head, MAX_STATE_BYTES + VMSTATE_HEADER_SIZE);
  // Save writes the whole state, so it is allocated: a length that reaches
  // into holes is damage, refused before a buffer of that size is made.
  const want = VMSTATE_HEADER_SIZE + header.stateLength;
  await image.loadMetadata(image.vmStateOffset, want);
  const first = image.allocatedRanges(image.vmStateOffset, want)[0];
  const written = first && first.allocated ? first.length : 0;
  if (written < want) {
    throw new SnapshotFormatError(path, `STVM header: state length ${header.stateLength} reaches past the written VM state area (${written} bytes allocated)`);
  }
  const state = await image.readVmState(VMSTATE_HEADER_SIZE, header.stateLength);
  const digests = await readDigests(path, image, want, state);
  const leader = state.subarray(0, header.leaderLength);
  const deviceState = state.subarray(header.leaderLength);

  // The saved stream skips from the ram setup section to the device state;
  // a ram END section between them makes it a stream the framer accepts.
  if (leader[header.ramSectionOffset] !== Token.SECTION_START) {
    throw new SnapshotFormatError(path, `no ram START section at leader byte ${header.ramSectionOffset}`);
  }
  const ramEnd = ramEndSection(leader.readUInt32BE(header.ramSectionOffset + 1));
  let records: MigrationRecord[];
  try {
    records = await parseRecords(Buffer.concat([leader, ramEnd, deviceState]), header.pageSize);
  } catch (err) {
    const why = err instanceof Error ? err.message : String(err);
    throw new SnapshotFormatError(path, `the saved stream in the VM state area is damaged: ${why}`);
  }
  let ramSection: SectionStartRecord | null = null;
  let configuration: ConfigurationRecord | null = null;
  let streamBlocks: RamBlockInfo[] | null = null;
  let vmdescription: unknown = null;
  let eofOffset = -1;
  for (const r of records) {
    if (r.type === 'section-start' && r.idstr === 'ram') ramSection = r;
    else if (r.type === 'configuration') configuration = r;
    else if (r.type === 'ram-mem-size') streamBlocks = r.blocks;
    else if (r.type === 'vmdescription') vmdescription = r.json;
    else if (r.type === 'eof') eofOffset = r.offset - ramEnd.length;
    else if (r.type === 'ram-page' || r.type === 'ram-zero') {
      throw new SnapshotFormatError(path, `the leader holds RAM pages (at byte ${r.offset}): not written by qemu-snap`);
    }
  }
  if (!ramSection || !streamBlocks) throw new SnapshotFormatError(path, 'the leader has no ram section with a block list');
  if (ramSection.offset !== header.ramSectionOffset) {
    throw new SnapshotFormatError(path, `STVM header says the ram section is at byte ${header.ramSectionOffset}, the leader has it at ${ramSection.offset}`);
  }
  if (eofOffset < header.leaderLength) throw new SnapshotFormatError(path, 'the device state has no EOF');
  const { blocks, virtualSize } = layoutRamBlocks(streamBlocks);
  if (virtualSize > image.virtualSize) {
    throw new SnapshotFormatError(path, `RAM blocks need ${virtualSize} bytes of disk, the image has ${image.virtualSize}`);
  }
  return {
    path,
    image,
    header,
    leader,
    deviceState,
    deviceSections: state.subarray(header.leaderLength, eofOffset),
    blocks,
    streamBlocks,
    ramSection,
    configuration,
    vmdescription,
    virtualSize,
    digests,
  };
}

/** The RAM digest extension after the state, checked against the state it covers; null when absent. */
async function readDigests(path: string, image: Qcow2Image, at: number, state: Buffer): Promise<DigestTable | null> {
  const hdr = decodeDigestHeader(path, await image.readVmState(at, DIGEST_HEADER_SIZE));
  if (!hdr) return null;
  const expected = Math.ceil(image.virtualSize / hdr.chunkSize);
  if (hdr.chunkCount !== expected) {
    throw new DigestMismatchError(`${path}: the RAM digest extension covers ${hdr.chunkCount} chunks, the disk has ${expected}`);
  }
  // The count follows the virtual size, which a header can make anything:
  // the table must lie in written clusters of the VM state area, as save
  // writes it, and fit in the file, before a buffer of its size is made.
  const tableEnd = at + DIGEST_HEADER_SIZE + hdr.chunkCount * 4;
  if (hdr.chunkCount * 4 > image.fileBytes) {
    throw new DigestMismatchError(`${path}: the RAM digest table (${hdr.chunkCount * 4} bytes) is larger than the file (${image.fileBytes} bytes)`);
  }
  await image.loadMetadata(image.vmStateOffset, tableEnd);
  const first = image.allocatedRanges(image.vmStateOffset, tableEnd)[0];
  const written = first && first.allocated ? first.length : 0;
  if (written < tableEnd) {
    throw new DigestMismatchError(`${path}: the RAM digest table reaches past the written VM state area (${tableEnd} bytes needed, ${written} allocated)`);
  }
  const table = decodeDigestTable(path, hdr, await image.readVmState(at + DIGEST_HEADER_SIZE, hdr.chunkCount * 4));
  if (zlib.crc32(state) !== table.stateCrc) {
    throw new DigestMismatchError(`${path}: the leader or device state in the VM state area is damaged (checksum mismatch)`);
  }
  return table;
}

/** SECTION_END of the ram section with nothing but EOS, and its footer. */
export function ramEndSection(sectionId: number): Buffer {
  const b = Buffer.alloc(18);
  b[0] = Token.SECTION_END;
  b.writeUInt32BE(sectionId, 1);
  b.writeUInt32BE(RamFlag.EOS, 9);
  b[13] = Token.SECTION_FOOTER;
  b.writeUInt32BE(sectionId, 14);
  return b;
}

/** Runs a whole in-memory stream through the framer. */
export function parseRecords(stream: Buffer, pageSize?: number): Promise<MigrationRecord[]> {
  return new Promise((resolve, reject) => {
    const out: MigrationRecord[] = [];
    const framer = new MigrationFramer({ pageSize });
    framer.on('data', (r: unknown) => out.push(r as MigrationRecord));
    framer.on('end', () => resolve(out));
    framer.on('error', reject);
    Readable.from([stream]).pipe(framer);
  });
}
