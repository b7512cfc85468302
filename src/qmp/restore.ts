// `qemu-snap restore --qmp`: feed an image to a QEMU started with
// `-incoming defer`.
//
//   IMAGE ──loadSnapshot──▶ socketpair ──migrate-incoming fd:NAME──▶ QEMU
//                    ◀──── return path (page requests, SHUT) ─────┘
//
// The destination runs the guest after the restore unless --paused (start
// QEMU with -S so that it never runs on its own: qemu-snap then sends `cont`
// itself, as early as the mode allows: at POSTCOPY_RUN, or at completion).
import * as fs from 'node:fs';
import * as net from 'node:net';
import { QemuSnapError } from '../errors';
import { FdWriter } from '../util/fd-writer';
import type { AioMode, CacheMode } from '../util/direct-io';
import { checkLoadCache, loadSnapshot, LoadResult, LoadProgress } from '../snapshot/load';
import { openSnapshot } from '../snapshot/snapshot-image';
import { QmpClient, QmpCommandError, QmpConnectOptions, QmpTimeoutError } from './client';
import { MigrationInfo, MigrationSettings, RunState, closeFd, passFd, socketPair, waitMigration } from './migration';
import { IncomingChannels, MultifdChannelSendError, MultifdStallError, connectChannels, privateSocketPath } from './restore-channels';
import { MultifdPlan, MultifdRestoreError, multifdPlan } from './restore-multifd';

export class QmpRestoreError extends QemuSnapError {
  constructor(
    readonly side: 'qemu' | 'qemu-snap' | 'interrupted',
    message: string,
  ) {
    super(message);
  }
}

export interface QmpRestoreOptions {
  /** Postcopy: switch after this percentage of the data pages (sets postcopy-ram on the destination). */
  postcopy?: number;
  /** Leave the restored VM stopped. */
  paused?: boolean;
  verify?: boolean;
  maxInFlight?: number;
  signal?: AbortSignal;
  onProgress?(bytes: number, pages: number, state: LoadProgress): void;
  connect?: QmpConnectOptions;
  /**
   * Migration channels (default 1: one stream over a socketpair). More turns
   * on the destination's multifd with multifd-channels N: qemu-snap connects
   * to its `migrate-incoming unix:PATH` (a private 0700 directory) N+1 times
   * and sends the data pages over the N multifd channels. Precopy only.
   */
  channels?: number;
  /**
   * multifd: how long QEMU may leave the channels full, or take to complete
   * after the whole stream went out (default 60 s), before the restore fails.
   */
  multifdStallMs?: number;
  /** How the image is read (load's --cache): none and directsync read with O_DIRECT. */
  cache?: CacheMode;
  /** The I/O engine for O_DIRECT reads (load's --aio). */
  aio?: AioMode;
}

export interface QmpRestoreResult extends LoadResult {
  /** ms from migrate-incoming until the guest ran (null with --paused). */
  runningMs: number | null;
  /** ms from migrate-incoming until QEMU reported completed. */
  completedMs: number;
  migration: MigrationInfo;
  runState: RunState;
}

interface RamBlockRow {
  id: string;
  used: number;
}

/** `info ramblock` (HMP): QEMU's own list of RAM blocks and their used lengths. */
async function destinationBlocks(qmp: QmpClient): Promise<RamBlockRow[] | null> {
  const text = await qmp.execute<string>('human-monitor-command', { 'command-line': 'info ramblock' }).catch(() => null);
  if (!text) return null;
  const rows: RamBlockRow[] = [];
  for (const line of text.split('\n')) {
    const m = /^\s*(\S+)\s+\S+\s+\S+\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)/i.exec(line);
    if (m) rows.push({ id: m[1], used: parseInt(m[3], 16) });
  }
  return rows.length > 0 ? rows : null;
}

/** Restores `imagePath` into the QEMU behind a QMP socket (or an open client). */
export async function restoreViaQmp(target: string | QmpClient, imagePath: string, opts: QmpRestoreOptions = {}): Promise<QmpRestoreResult> {
  const qmp = typeof target === 'string' ? await QmpClient.connect(target, opts.connect) : target;
  try {
    return await runRestore(qmp, imagePath, opts);
  } finally {
    if (typeof target === 'string') qmp.close();
  }
}

async function runRestore(qmp: QmpClient, imagePath: string, opts: QmpRestoreOptions): Promise<QmpRestoreResult> {
  const status = await qmp.execute<RunState>('query-status');
  if (status.status !== 'inmigrate') {
    throw new QmpRestoreError('qemu', `QEMU is not waiting for an incoming migration (it is ${status.status}): start it with -incoming defer`);
  }
  // QEMU >= 9.1 keeps running after a failed incoming migration and says why
  // in query-migrate; older ones exit, their reason only on their stderr.
  const keepsRunning = qmp.version.major > 9 || (qmp.version.major === 9 && qmp.version.minor >= 1);
  const channels = opts.channels ?? 1;
  if (!Number.isInteger(channels) || channels < 1 || channels > 64) throw new QmpRestoreError('qemu-snap', `--channels ${channels}: must be a whole number from 1 to 64; QEMU was not touched`);
  if (channels > 1 && opts.postcopy !== undefined) {
    throw new QmpRestoreError(
      'qemu-snap',
      `--postcopy cannot be combined with --channels ${channels}: QEMU 10.0 refuses postcopy-ram together with multifd ("Postcopy is not yet compatible with multifd"), and 7.2 accepts the pair but its postcopy load has no multifd support; use --channels 1; QEMU was not touched`,
    );
  }
  try {
    checkLoadCache(imagePath, opts.cache, opts.aio);
  } catch (err) {
    throw new QmpRestoreError('qemu-snap', `${(err as Error).message}; QEMU was not touched`);
  }
  if (!keepsRunning) await checkRamBlocks(qmp, imagePath);
  // multifd: what the destination needs to know before anything is sent.
  const plan: MultifdPlan | null = channels > 1
    ? await multifdPlan(qmp, imagePath, channels).catch((err: Error) => {
        throw err instanceof MultifdRestoreError ? new QmpRestoreError('qemu', err.message) : err;
      })
    : null;

  // multifd and multifd-channels are put back afterwards.
  const settings = plan ? new MigrationSettings(qmp) : null;
  if (plan && settings) {
    await settings.apply({ multifd: true }, { 'multifd-channels': plan.channels }).catch((err: Error) => {
      const why = err instanceof QmpCommandError ? err.desc : err.message;
      void settings.restore().catch(() => undefined);
      throw new QmpRestoreError('qemu', `the destination refused the multifd capability that --channels ${plan.channels} needs: ${why} (use --channels 1, or change what QEMU names); nothing was sent`);
    });
  }

  const caps = [{ capability: 'events', state: true }];
  if (opts.postcopy !== undefined) caps.push({ capability: 'postcopy-ram', state: true });
  await qmp.execute('migrate-set-capabilities', { capabilities: caps }).catch((err: Error) => {
    throw new QmpRestoreError('qemu', `setting up the incoming migration: ${err.message}`);
  });
  // One stream: a socketpair, our end written with blocking writes. multifd:
  // QEMU listens on a socket in a private directory, we connect N+1 times.
  const [ours, theirs] = plan ? [-1, -1] : socketPair();
  let socketDir: { path: string; remove: () => Promise<void> } | null = null;
  let incoming: IncomingChannels | null = null;
  let fdName: string | null = null;
  const t0 = performance.now();
  let runningMs: number | null = null;
  const offResume = qmp.onEvent((ev) => {
    if (ev.event === 'RESUME' && runningMs === null) runningMs = performance.now() - t0;
  });
  const stopLoad = new AbortController();
  const onOuterAbort = () => stopLoad.abort(opts.signal?.reason);
  opts.signal?.addEventListener('abort', onOuterAbort);
  // A load waiting for a full multifd channel to drain ends with the restore.
  stopLoad.signal.addEventListener('abort', () => incoming?.sender.destroy(new QemuSnapError(`restore interrupted (${String(stopLoad.signal.reason ?? 'aborted')})`)));
  const postcopy = opts.postcopy !== undefined;
  // Postcopy reads page requests from the same socket: a Node socket. Precopy
  // writes with blocking writes from one buffer (FdWriter, the fast path).
  const sock = postcopy ? new net.Socket({ fd: ours, readable: true, writable: true }) : null;
  try {
    let uri: string;
    if (plan) {
      socketDir = await privateSocketPath();
      uri = `unix:${socketDir.path}`;
    } else {
      fdName = await passFd(qmp, theirs);
      uri = `fd:${fdName}`;
    }
    const args: Record<string, unknown> = { uri };
    if (keepsRunning) args['exit-on-error'] = false;
    await qmp.execute('migrate-incoming', args).catch((err: Error) => {
      throw new QmpRestoreError('qemu', `QEMU refused migrate-incoming: ${err instanceof QmpCommandError ? err.desc : err.message}`);
    });
    fdName = null;
    if (plan && socketDir) {
      incoming = await connectChannels(socketDir.path, { ...plan, stallMs: opts.multifdStallMs, signal: stopLoad.signal }).catch((err: Error) => {
        if (opts.signal?.aborted) throw new QmpRestoreError('interrupted', `restore interrupted (${String(opts.signal.reason ?? 'aborted')}) while connecting to QEMU`);
        throw new QmpRestoreError('qemu-snap', err.message);
      });
    }
    const loading = loadSnapshot(imagePath, {
      multifd: incoming?.sender,
      stdout: incoming?.main ?? sock ?? (new FdWriter(ours) as unknown as NodeJS.WritableStream),
      returnPath: sock ?? undefined,
      postcopy: opts.postcopy,
      verify: opts.verify,
      maxInFlight: opts.maxInFlight,
      cache: opts.cache,
      aio: opts.aio,
      signal: stopLoad.signal,
      onProgress: opts.onProgress,
    }).then(
      (r) => ({ ok: true as const, r }),
      (err: Error) => ({ ok: false as const, err }),
    );
    let sentCont = false;
    const startGuest = async (): Promise<void> => {
      if (opts.paused || sentCont) return;
      const now = await qmp.execute<RunState>('query-status');
      if (now.status === 'inmigrate' || now.running) return;
      sentCont = true;
      await qmp.execute('cont');
      if (runningMs === null) runningMs = performance.now() - t0;
    };
    const qemuDone = waitMigration(
      qmp,
      (s) => s === 'completed' || s === 'failed' || s === 'cancelled',
      {
        pollMs: 20,
        onInfo: (i) => {
          // In postcopy the guest may run as soon as POSTCOPY_RUN is in.
          if (i.status === 'postcopy-active') void startGuest().catch(() => undefined);
        },
      },
    ).then(
      (i) => ({ ok: true as const, i }),
      (err: Error) => ({ ok: false as const, err }),
    );
    const first = await Promise.race([loading.then((l) => ({ from: 'load' as const, l })), qemuDone.then((q) => ({ from: 'qemu' as const, q }))]);
    if (first.from === 'load' && !first.l.ok) {
      if (opts.signal?.aborted) throw new QmpRestoreError('interrupted', `restore interrupted (${String(opts.signal.reason ?? 'aborted')}): the incoming migration failed`);
      // Either our side failed (QEMU then sees the stream end early), or
      // QEMU refused the stream and closed its end (our write fails): QEMU's
      // final status tells which.
      const q = await Promise.race([qemuDone, new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
      if (q?.ok && q.i.status === 'failed' && isPeerGone(first.l.err)) throw await qemuRefused(qmp, imagePath, q.i);
      if (q && !q.ok && isPeerGone(first.l.err)) throw wentAway(q.err, keepsRunning);
      if (plan && first.l.err instanceof MultifdStallError) throw new QmpRestoreError('qemu', `${first.l.err.message}: ${marksHint(plan)}`);
      if (first.l.err instanceof MultifdChannelSendError && isPeerGone(first.l.err)) {
        // 7.2 reports a refused channel (bad uuid, bad packet) only on its stderr.
        throw new QmpRestoreError('qemu', `QEMU refused the image: ${first.l.err.message}${q?.ok && q.i['error-desc'] ? `: ${q.i['error-desc']}` : '; its reason is on its stderr'}`);
      }
      throw new QmpRestoreError('qemu-snap', `qemu-snap failed: ${first.l.err.message}${q?.ok && q.i['error-desc'] ? ` (then QEMU: ${q.i['error-desc']})` : ''}`);
    }
    // multifd: a destination that waits at other sync marks than the ones
    // sent (started with -global migration.multifd-flush-after-each-section
    // against its machine type) never completes: give up some time after the
    // whole stream went out.
    const stallMs = opts.multifdStallMs ?? 60_000;
    const q = plan
      ? await Promise.race([qemuDone, loading.then((l) => (l.ok ? new Promise<null>((r) => setTimeout(() => r(null), stallMs).unref()) : qemuDone))])
      : await qemuDone;
    if (q === null && plan) {
      stopLoad.abort(new QemuSnapError('stalled'));
      throw new QmpRestoreError('qemu', `QEMU has not completed ${Math.round(stallMs / 1000)} s after the whole stream went out over ${plan.channels} multifd channels: ${marksHint(plan)}`);
    }
    if (q === null) throw new QmpRestoreError('qemu', 'QEMU has not completed');
    if (!q.ok) {
      stopLoad.abort(q.err);
      await loading;
      if (plan && q.err instanceof QmpTimeoutError) throw new QmpRestoreError('qemu', `QEMU stopped answering QMP during a restore over ${plan.channels} multifd channels (${q.err.message}): ${marksHint(plan)}`);
      throw wentAway(q.err, keepsRunning);
    }
    if (q.i.status !== 'completed') {
      stopLoad.abort(new QemuSnapError(`QEMU ${q.i.status} the migration`));
      const l = await loading;
      // QEMU fails as soon as a stalled restore closes the channels: the stall is the reason.
      if (plan && !l.ok && l.err instanceof MultifdStallError) throw new QmpRestoreError('qemu', `${l.err.message}: ${marksHint(plan)}`);
      throw await qemuRefused(qmp, imagePath, q.i);
    }
    const completedMs = performance.now() - t0;
    const l = await loading;
    if (!l.ok) throw new QmpRestoreError('qemu-snap', `qemu-snap failed after QEMU completed: ${l.err.message}`);
    await startGuest();
    let runState = await qmp.execute<RunState>('query-status');
    if (opts.paused && runState.running) {
      // A QEMU without -S started the guest itself.
      await qmp.execute('stop');
      runState = await qmp.execute<RunState>('query-status');
    }
    return { ...l.r, runningMs: opts.paused ? null : runningMs, completedMs, migration: q.i, runState };
  } finally {
    offResume();
    opts.signal?.removeEventListener('abort', onOuterAbort);
    if (fdName && !qmp.closed) await closeFd(qmp, fdName).catch(() => undefined);
    incoming?.close();
    if (socketDir) await socketDir.remove().catch(() => undefined);
    // Only once QEMU is done with the incoming migration: its multifd
    // cleanup asks the capability whether there is anything to clean up.
    if (settings && !qmp.closed) {
      // Bounded: a stalled QEMU must not hold up the end of an interrupted restore.
      const st = await Promise.race([qmp.execute<MigrationInfo>('query-migrate').catch(() => null), new Promise<null>((r) => setTimeout(() => r(null), 2000).unref())]);
      if (st && (st.status === 'completed' || st.status === 'failed')) await settings.restore().catch(() => undefined);
    }
    if (sock) sock.destroy();
    else if (ours >= 0) {
      try {
        fs.closeSync(ours);
      } catch {
        // already closed
      }
    }
  }
}

/** Why a multifd destination may wait for ever: it syncs at other marks than the ones sent. */
function marksHint(plan: MultifdPlan): string {
  const sent = plan.marks === 'eos' ? 'syncs at every RAM EOS' : 'one MULTIFD_FLUSH sync';
  const other = plan.marks === 'eos' ? 'off' : 'on';
  return `it probably waits at other sync marks than the ${sent} qemu-snap sent for machine type ${plan.machineType || '?'} (was it started with -global migration.multifd-flush-after-each-section=${other}?); use --channels 1`;
}

function isPeerGone(err: Error): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EPIPE' || code === 'ECONNRESET' || /EPIPE|ECONNRESET|closed the pipe|premature close|closed its return path|rejected POSTCOPY_ADVISE/i.test(err.message);
}

function wentAway(err: Error, keepsRunning: boolean): QmpRestoreError {
  return new QmpRestoreError('qemu', `QEMU went away during the restore (${err.message}): ${keepsRunning ? '' : 'QEMU before 9.1 exits when an incoming migration fails; '}its reason is on QEMU's stderr`);
}

/** QEMU's reason (query-migrate error-desc), with what `info ramblock` shows when the RAM layout differs. */
async function qemuRefused(qmp: QmpClient, imagePath: string, info: MigrationInfo): Promise<QmpRestoreError> {
  let layout = '';
  try {
    await checkRamBlocks(qmp, imagePath);
  } catch (err) {
    layout = `; ${(err as Error).message.replace(/^the destination does not match the image: /, '')}`;
  }
  return new QmpRestoreError('qemu', `QEMU refused the image: ${info['error-desc'] ?? `migration ${info.status}`}${layout}`);
}

/** Before any byte goes out: QEMU's RAM blocks must be the image's, or a QEMU < 9.1 would exit on the first mismatch. */
async function checkRamBlocks(qmp: QmpClient, imagePath: string): Promise<void> {
  const dest = await destinationBlocks(qmp);
  if (!dest) return;
  const snap = await openSnapshot(imagePath);
  try {
    const byId = new Map(dest.map((b) => [b.id, b.used] as const));
    for (const b of snap.blocks) {
      const used = byId.get(b.id);
      if (used === undefined) throw new QmpRestoreError('qemu', `the destination does not match the image: QEMU has no RAM block ${b.id} (its blocks: ${dest.map((d) => d.id).join(', ')}); is it the same machine type?`);
      if (used !== b.length) {
        throw new QmpRestoreError('qemu', `the destination does not match the image: RAM block length mismatch: ${b.id} is 0x${used.toString(16)} bytes in QEMU, 0x${b.length.toString(16)} in the image (check -m and the machine type)`);
      }
    }
  } finally {
    await snap.image.close().catch(() => undefined);
  }
}
