// What the progress line says for save, load and verify: RAM covered out of
// RAM in all (MEM_SIZE gives the total at the start of the stream), and the
// page counts kept apart (data, zero, re-sent).
import type { ProgressState } from '../util/progress';
import type { SnapshotSummary } from './snapshot-writer';
import type { LoadProgress } from './load';

/**
 * Save: a page is covered by its first PAGE or ZERO record; any later record
 * for it is a re-send. QEMU's first pass sends every page once, so re-sends
 * only begin once a live VM's dirtied pages come round again: from then on
 * the end depends on the guest, and there is no ETA.
 */
export function saveProgress(streamBytes: number, s: SnapshotSummary): ProgressState {
  const ps = s.pageSize;
  const resent = s.pageRecords + s.zeroRecords - s.coveredPages;
  return {
    covered: s.coveredPages * ps,
    total: s.totalPages * ps,
    moved: streamBytes,
    fraction: resent > 0 ? null : undefined,
    stage: s.totalPages === 0 ? 'before the RAM block list' : resent > 0 ? 're-sending dirtied pages' : 'first pass',
    detail: `${s.dataPages} data pages, ${s.coveredPages - s.dataPages} zero, ${resent} re-sent`,
  };
}

/** Load: every page goes out once; data pages take the time, so the ETA follows them. */
export function loadProgress(streamBytes: number, p: LoadProgress): ProgressState {
  const pc = p.postcopy;
  return {
    covered: (p.dataPagesSent + p.zeroPagesSent) * p.pageSize,
    total: p.totalPages * p.pageSize,
    moved: streamBytes,
    fraction: p.dataPages > 0 ? p.dataPagesSent / p.dataPages : undefined,
    stage: pc ? (pc.switched ? `postcopy: the VM runs, ${pc.requests} page requests served` : 'postcopy: before the switch') : undefined,
    detail: `${p.dataPagesSent} of ${p.dataPages} data pages, ${p.zeroPagesSent} zero`,
  };
}

/** Verify: RAM (the virtual disk) checked chunk by chunk; only data is read. */
export function verifyProgress(checkedBytes: number, totalBytes: number, readBytes: number, dataPages: number): ProgressState {
  return { covered: checkedBytes, total: totalBytes, moved: readBytes, detail: `${dataPages} data pages` };
}
