// Checking RAM against the digests recorded at save: chunk by chunk, reads
// from the image (page cache when the loader just read it), CRC-32 in the
// digest worker. Used by `load` (alongside the stream) and by `verify`.
import { ChunkDigester, DigestMismatchError, zeroChunkCrc } from './digests';
import { openSnapshot, SnapshotContents } from './snapshot-image';
import { QemuSnapError } from '../errors';

export interface VerifyResult {
  chunks: number;
  /** Pages that are not all zero, as read from the image. */
  dataPages: number;
  summary: string;
}

const CHUNKS_IN_FLIGHT = 3;

/** Verifies every chunk of the virtual disk against the image's digest table. */
export async function verifyChunks(snap: SnapshotContents, digester: ChunkDigester, signal?: AbortSignal): Promise<{ chunks: number; dataPages: number }> {
  const table = snap.digests;
  if (!table) throw new QemuSnapError(`${snap.path}: no RAM digests to verify`);
  const size = snap.image.virtualSize;
  const cs = table.chunkSize;
  let next = 0;
  let dataPages = 0;
  const worker = async (): Promise<void> => {
    while (next < table.chunks.length) {
      if (signal?.aborted) throw new QemuSnapError('verification interrupted');
      const c = next++;
      const offset = c * cs;
      const length = Math.min(cs, size - offset);
      await snap.image.loadMetadata(offset, length);
      const allocated = snap.image.allocatedRanges(offset, length).some((r) => r.allocated);
      let crc: number;
      if (allocated) {
        const d = await digester.digest(await snap.image.read(offset, length));
        crc = d.crc;
        dataPages += d.dataPages;
      } else {
        crc = zeroChunkCrc(length);
      }
      if (crc !== table.chunks[c]) {
        throw new DigestMismatchError(`${snap.path}: RAM digest mismatch ${where(snap, offset)} (chunk ${c}): the image is damaged`);
      }
    }
  };
  await Promise.all(Array.from({ length: CHUNKS_IN_FLIGHT }, worker));
  return { chunks: table.chunks.length, dataPages };
}

function where(snap: SnapshotContents, offset: number): string {
  const b = snap.blocks.find((x) => offset >= x.offset && offset < x.offset + Math.max(x.length, 1));
  return b ? `in block ${b.id} at offset 0x${(offset - b.offset).toString(16)}` : `at disk offset 0x${offset.toString(16)} (outside every RAM block)`;
}

/** `qemu-snap verify`: structure (open checks everything load checks) and, when present, every digest. */
export async function verifySnapshot(path: string): Promise<VerifyResult> {
  const snap = await openSnapshot(path);
  try {
    if (!snap.digests) {
      return { chunks: 0, dataPages: snap.header.dataPages, summary: 'structure ok; this image has no RAM digests (saved without them), so RAM was not checked' };
    }
    const digester = new ChunkDigester(snap.header.pageSize);
    try {
      const r = await verifyChunks(snap, digester);
      if (r.dataPages !== snap.header.dataPages) {
        throw new DigestMismatchError(`${path}: the image holds ${r.dataPages} data pages, its STVM header says ${snap.header.dataPages}`);
      }
      return { ...r, summary: `ok: ${r.chunks} RAM chunks and the device state match their digests; ${r.dataPages} data pages` };
    } finally {
      await digester.close();
    }
  } finally {
    await snap.image.close().catch(() => undefined);
  }
}
