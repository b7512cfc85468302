// What a multifd restore must know of the destination before a byte goes
// out: that it has the multifd capability and takes uncompressed channels,
// its uuid (multifd_recv_initial_packet compares each channel's with its
// own), the image's page size, and which main-stream records are sync
// marks for it.
//
// Sync marks (ram_load_precopy): QEMU 7.2 syncs its channels at every RAM
// EOS. 8.0 added RAM_SAVE_FLAG_MULTIFD_FLUSH and the migration property
// multifd-flush-after-each-section: on, EOS still syncs (and a FLUSH too);
// off, only a FLUSH does. Machine types up to 8.0 turn it on (hw_compat_8_0),
// newer ones leave it off. The property itself cannot be read over QMP (the
// migration object is not in the QOM tree): the machine type tells, unless
// the destination was started with -global migration.multifd-flush-after-
// each-section=..., which qemu-snap cannot see.
import { QemuSnapError } from '../errors';
import { openSnapshot, parseRecords, ramEndSection } from '../snapshot/snapshot-image';
import { parseUuid } from '../migration/multifd-encoder';
import type { QmpClient } from './client';

export class MultifdRestoreError extends QemuSnapError {}

export interface MultifdPlan {
  channels: number;
  uuid: Buffer;
  pageSize: number;
  marks: 'eos' | 'flush';
  /** Sync marks the saved leader already holds (the RAM setup section's EOS on 'eos' destinations). */
  leaderMarks: number;
  /** The destination's machine type, for messages. */
  machineType: string;
}

/** 'eos' or 'flush' for a QEMU of `version` running `machineType` (qom-get /machine type). */
export function syncMarks(version: { major: number; minor: number }, machineType: string): 'eos' | 'flush' {
  if (version.major < 8) return 'eos';
  const m = /-(\d+)\.(\d+)(?:-machine)?$/.exec(machineType);
  if (m && (Number(m[1]) < 8 || (Number(m[1]) === 8 && Number(m[2]) === 0))) return 'eos';
  return 'flush';
}

/** Checks the destination can take `channels` multifd channels; touches nothing. */
export async function multifdPlan(qmp: QmpClient, imagePath: string, channels: number): Promise<MultifdPlan> {
  const caps = await qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities');
  if (!caps.some((c) => c.capability === 'multifd')) {
    throw new MultifdRestoreError(`the destination QEMU ${qmp.version.major}.${qmp.version.minor} has no multifd capability, which --channels ${channels} needs: use --channels 1; QEMU was not touched`);
  }
  const params = await qmp.execute<Record<string, unknown>>('query-migrate-parameters');
  const compression = params['multifd-compression'];
  if (compression !== undefined && compression !== 'none') {
    throw new MultifdRestoreError(`multifd-compression is ${String(compression)} on the destination: qemu-snap sends only uncompressed multifd channels (set multifd-compression none, or use --channels 1); QEMU was not touched`);
  }
  const uuid = parseUuid((await qmp.execute<{ UUID: string }>('query-uuid')).UUID);
  const machineType = await qmp.execute<string>('qom-get', { path: '/machine', property: 'type' }).catch(() => '');
  const marks = syncMarks(qmp.version, machineType);
  const snap = await openSnapshot(imagePath);
  try {
    const records = await parseRecords(Buffer.concat([snap.leader, ramEndSection(snap.ramSection.sectionId), snap.deviceState]), snap.header.pageSize);
    let leaderMarks = 0;
    for (const r of records) {
      if (r.offset >= snap.leader.length) break;
      if (r.type === 'ram-multifd-flush' || (r.type === 'ram-eos' && marks === 'eos')) leaderMarks++;
    }
    return { channels, uuid, pageSize: snap.header.pageSize, marks, leaderMarks, machineType: machineType.replace(/-machine$/, '') };
  } finally {
    await snap.image.close().catch(() => undefined);
  }
}
