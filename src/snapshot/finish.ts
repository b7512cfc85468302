// The step that turns a fully written image into a snapshot: the STVM header
// at the start of the VM state area, the RAM digest table after the device
// state, then everything flushed and fsynced. Publishing (rename into place)
// is the caller's: saveSnapshot links a temporary file, a library user may
// write in place.
import * as zlib from 'node:zlib';
import { Qcow2Image } from '../image';
import { SnapshotSummary } from './snapshot-writer';
import { encodeSnapshotHeader, VMSTATE_HEADER_SIZE } from './layout';
import { DIGEST_CHUNK_SIZE, encodeDigestTable, SAVE_DIGEST_ALGORITHM } from './digests';
import { ChunkTracker } from './chunk-tracker';

/** Finishes `image` after the stream ended: header, digests (when a tracker recorded them), flush and (unless sync is false) fsync. */
export async function finishSnapshotImage(image: Qcow2Image, summary: SnapshotSummary, tracker?: ChunkTracker | null, opts: { sync?: boolean } = {}): Promise<void> {
  const stateLength = summary.leaderLength + summary.deviceStateLength;
  await image.writeVmState(
    0,
    encodeSnapshotHeader({
      pageSize: summary.pageSize,
      dataPages: summary.dataPages,
      ramSectionOffset: summary.ramSectionOffset,
      leaderLength: summary.leaderLength,
      stateLength,
    }),
  );
  if (tracker) {
    const chunks = await tracker.finish();
    const stateCrc = zlib.crc32(await image.readVmState(VMSTATE_HEADER_SIZE, stateLength));
    await image.writeVmState(VMSTATE_HEADER_SIZE + stateLength, encodeDigestTable({ algorithm: SAVE_DIGEST_ALGORITHM, chunkSize: DIGEST_CHUNK_SIZE, stateCrc, chunks }));
  }
  // One fsync covers every descriptor of the file (the O_DIRECT data one too): it is the inode's.
  // --cache=unsafe skips it.
  await image.flush({ sync: opts.sync ?? true });
}
