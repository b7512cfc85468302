// `qemu-snap save --qmp`: drive a running QEMU's migration into an image.
//
//   QEMU ──migrate fd:NAME──▶ socketpair ──▶ saveSnapshot ──▶ IMAGE
//        ◀──── return path (PONG, SHUT) ────┘
//
// QEMU gets its end of the socketpair with getfd (SCM_RIGHTS): no exec:, no
// PATH, no shell. A socketpair rather than a pipe: with return-path on, QEMU
// reads our SHUT from the same channel it writes the stream to, and a pipe
// end only goes one way. Capabilities and parameters are changed for the
// duration and put back; the VM is left in the run state it had (or stopped,
// for --stop) whatever happens.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { QemuSnapError } from '../errors';
import { FdReader } from '../util/fd-reader';
import { FdWriter } from '../util/fd-writer';
import { checkSaveCache, saveSnapshot, SaveResult } from '../snapshot/save';
import { AioMode, CacheMode } from '../util/direct-io';
import { MultifdMerger } from '../migration/multifd-merger';
import { ChannelKind, ChannelListener, listenPrivate } from './channels';
import type * as net from 'node:net';
import { QmpClient, QmpConnectOptions, QmpError } from './client';
import { MigrationInfo, MigrationSettings, RunState, closeFd, isInProgress, isTerminal, passFd, socketPair, waitMigration } from './migration';

/** Which side ended the save: QEMU, qemu-snap, or a signal. */
export type FailedSide = 'qemu' | 'qemu-snap' | 'interrupted';

export class QmpSaveError extends QemuSnapError {
  constructor(
    readonly side: FailedSide,
    message: string,
  ) {
    super(message);
  }
}

export type QmpSaveMode = 'live' | 'stop' | 'background';

export interface QmpSaveProgress {
  /** Stream bytes received and page records parsed, from our side. */
  streamBytes: number;
  pageRecords: number;
  /** From QEMU's query-migrate. */
  status?: string;
  transferred?: number;
  remaining?: number;
  dirtyPagesRate?: number;
  iteration?: number;
}

export interface QmpSaveOptions {
  /** live (default): precopy, then `cont`; stop: the VM stays stopped; background: background-snapshot. */
  mode?: QmpSaveMode;
  /** downtime-limit in ms, passed to QEMU for the duration. */
  downtimeLimitMs?: number;
  /** max-bandwidth in bytes/s for the duration (default 100 GB/s: no limit to speak of). */
  maxBandwidth?: number;
  force?: boolean;
  clusterSize?: number;
  pageSize?: number;
  maxInFlight?: number;
  /** The image's host cache mode and I/O engine, as for saveSnapshot. */
  cache?: CacheMode;
  aio?: AioMode;
  /** Aborting (SIGINT) cancels QEMU's migration and leaves nothing behind. */
  signal?: AbortSignal;
  onProgress?(p: QmpSaveProgress): void;
  /** Connection options when a socket path is given. */
  connect?: QmpConnectOptions;
  /**
   * Migration channels (default 1: one stream over a socketpair). More turns
   * on QEMU's multifd with multifd-channels N over a unix socket of ours;
   * ignored (one channel) for background mode, which QEMU cannot combine
   * with multifd.
   */
  channels?: number;
  /**
   * Sees each accepted migration connection before qemu-snap reads it
   * (paused; its 'data' events start from its first byte): monitoring, and
   * tests that capture the channels or close one.
   */
  onChannel?(socket: net.Socket, kind: ChannelKind): void;
}

export interface QmpSaveResult extends SaveResult {
  /** QEMU's final query-migrate. */
  migration: MigrationInfo;
  /** The run state the VM was left in. */
  runState: RunState;
  /** Wall time from `migrate` to a published image and QEMU completed, ms. */
  wallMs: number;
}

const DEFAULT_BANDWIDTH = 100e9;

/**
 * Capabilities qemu-snap cannot serve as a destination (a second channel,
 * pages it cannot decode, a wait for a command nobody sends): turned off for
 * the duration, put back after.
 */
const OFF_ALWAYS = ['xbzrle', 'compress', 'multifd', 'mapped-ram', 'postcopy-preempt', 'switchover-ack', 'pause-before-switchover', 'x-colo', 'zero-copy-send', 'rdma-pin-all'];
/** What background-snapshot cannot be combined with (QEMU's migrate_caps_check). */
const OFF_FOR_BACKGROUND = ['return-path', 'postcopy-ram', 'dirty-bitmaps', 'postcopy-blocktime', 'late-block-activate', 'auto-converge', 'release-ram', 'validate-uuid'];

/** Saves the VM behind a QMP socket (or an open QmpClient) into `imagePath`. */
export async function saveViaQmp(target: string | QmpClient, imagePath: string, opts: QmpSaveOptions = {}): Promise<QmpSaveResult> {
  const qmp = typeof target === 'string' ? await QmpClient.connect(target, opts.connect) : target;
  try {
    return await runSave(qmp, imagePath, opts);
  } finally {
    if (typeof target === 'string') qmp.close();
  }
}

async function runSave(qmp: QmpClient, imagePath: string, opts: QmpSaveOptions): Promise<QmpSaveResult> {
  const mode = opts.mode ?? 'live';
  if (!opts.force && (await fs.promises.lstat(imagePath).then(() => true, () => false))) {
    throw new QmpSaveError('qemu-snap', `${imagePath}: already exists (use --force to replace it); QEMU was not touched`);
  }
  // The image is made beside its final name: a directory we cannot write is
  // found before QEMU starts anything.
  const imageDir = path.dirname(path.resolve(imagePath));
  await fs.promises.access(imageDir, fs.constants.W_OK | fs.constants.X_OK).catch((err: NodeJS.ErrnoException) => {
    throw new QmpSaveError('qemu-snap', `${imageDir}: cannot write the image there (${err.code ?? err.message}); QEMU was not touched`);
  });
  try {
    checkSaveCache(imagePath, opts.cache, opts.aio);
  } catch (err) {
    throw new QmpSaveError('qemu-snap', `${(err as Error).message}; QEMU was not touched`);
  }
  const before = await qmp.execute<RunState>('query-status');
  const state = await qmp.execute<MigrationInfo>('query-migrate');
  if (isInProgress(state.status)) throw new QmpSaveError('qemu', `QEMU is already migrating (status ${state.status}): nothing was changed`);
  if (before.status === 'inmigrate') throw new QmpSaveError('qemu', 'QEMU is waiting for an incoming migration: there is no VM to save yet');
  if (mode === 'background' && !before.running) throw new QmpSaveError('qemu', `--background needs a running VM (it is ${before.status}): use the default mode or --stop`);

  const settings = new MigrationSettings(qmp);
  const caps: Record<string, boolean> = {};
  for (const c of OFF_ALWAYS) caps[c] = false;
  if (mode === 'background') {
    for (const c of OFF_FOR_BACKGROUND) caps[c] = false;
    caps['background-snapshot'] = true;
  } else {
    caps['background-snapshot'] = false;
    caps['return-path'] = true;
  }
  // MIGRATION events wake our wait at once instead of at the next poll.
  caps.events = true;
  if (mode === 'background' && !('background-snapshot' in (await settings.capabilities()))) {
    throw new QmpSaveError('qemu', 'this QEMU has no background-snapshot capability');
  }
  const channels = mode === 'background' ? 1 : opts.channels ?? 1;
  if (!Number.isInteger(channels) || channels < 1 || channels > 64) throw new QmpSaveError('qemu-snap', `--channels ${channels}: must be a whole number from 1 to 64; QEMU was not touched`);
  const multifd = channels > 1;
  const params: Record<string, number> = { 'max-bandwidth': Math.round(opts.maxBandwidth ?? DEFAULT_BANDWIDTH) };
  if (multifd) {
    if (!('multifd' in (await settings.capabilities()))) throw new QmpSaveError('qemu', 'this QEMU has no multifd capability: use --channels 1');
    const current = await settings.parameters();
    const compression = current['multifd-compression'];
    if (compression !== undefined && compression !== 'none') {
      throw new QmpSaveError('qemu', `multifd-compression is ${String(compression)} on this QEMU: qemu-snap takes only uncompressed multifd channels (set multifd-compression none, or use --channels 1); QEMU was not touched`);
    }
    caps.multifd = true;
    params['multifd-channels'] = channels;
  }
  if (opts.downtimeLimitMs !== undefined) params['downtime-limit'] = opts.downtimeLimitMs;

  let ours = -1;
  let listener: ChannelListener | null = null;
  let fdName: string | null = null;
  let migrating = false;
  let stoppedByUs = false;
  let result: QmpSaveResult | null = null;
  let failure: QmpSaveError | null = null;
  const stopSave = new AbortController();
  const onOuterAbort = () => stopSave.abort(opts.signal?.reason);
  opts.signal?.addEventListener('abort', onOuterAbort);
  const t0 = performance.now();
  try {
    await settings.apply(caps, params).catch((err: Error) => {
      throw new QmpSaveError('qemu', `setting up the migration: ${err.message}`);
    });
    if (mode === 'stop' && before.running) {
      await qmp.execute('stop');
      stoppedByUs = true;
    }
    let uri: string;
    let input: Promise<{ stream: NodeJS.ReadableStream; returnPath: NodeJS.WritableStream }>;
    let merger: MultifdMerger | undefined;
    if (multifd) {
      // QEMU connects the main channel and N multifd channels to our socket.
      const l = (listener = await listenPrivate());
      const m = (merger = new MultifdMerger({ channels, pageSize: opts.pageSize }));
      uri = `unix:${l.path}`;
      input = new Promise((resolve, reject) => {
        let main: net.Socket | null = null;
        const onAbort = () => reject(stopSave.signal.reason instanceof Error ? stopSave.signal.reason : new QemuSnapError(String(stopSave.signal.reason ?? 'aborted')));
        stopSave.signal.addEventListener('abort', onAbort, { once: true });
        l.onError((err) => {
          m.destroy(err);
          if (main === null) reject(err);
        });
        l.onChannel((socket, kind) => {
          opts.onChannel?.(socket, kind);
          if (kind === 'multifd') return m.addChannel(socket);
          if (main !== null) {
            socket.destroy();
            m.destroy(new QemuSnapError('QEMU connected a second main migration channel'));
            return;
          }
          main = socket;
          stopSave.signal.removeEventListener('abort', onAbort);
          resolve({ stream: socket, returnPath: socket });
        });
      });
    } else {
      const pair = socketPair();
      ours = pair[0];
      fdName = await passFd(qmp, pair[1]);
      uri = `fd:${fdName}`;
      // FdReader holds a partial chunk back while reads come back as full as
      // the pipe it expects; a socket read can return up to its 1 MiB buffer,
      // so "full" must be unreachable: every read that does not fill the chunk
      // is handed over once the socket stays quiet for the reader's dry wait
      // (1 ms), or the tail QEMU sent before waiting for our SHUT could sit in
      // the reader forever.
      const reader = new FdReader(ours, { pipeSize: 1 << 30 });
      // QEMU sends from the moment it gets `migrate`: a reader thread still
      // starting then was ~50 ms of total-time spent on a full socket.
      await reader.started;
      input = Promise.resolve({ stream: reader as unknown as NodeJS.ReadableStream, returnPath: returnPathWriter(ours) });
    }

    let info: MigrationInfo = {};
    let streamBytes = 0;
    let pageRecords = 0;
    const report = () => {
      const ram = info.ram;
      opts.onProgress?.({
        streamBytes,
        pageRecords,
        status: info.status,
        transferred: ram?.transferred,
        remaining: ram?.remaining,
        dirtyPagesRate: ram?.['dirty-pages-rate'],
        iteration: ram?.['dirty-sync-count'],
      });
    };
    let fileOpen = (): void => undefined;
    const fileOpened = new Promise<void>((resolve) => (fileOpen = resolve));
    const saving = input.then(({ stream, returnPath }) => saveSnapshot(stream, imagePath, {
      force: opts.force,
      clusterSize: opts.clusterSize,
      pageSize: opts.pageSize,
      maxInFlight: opts.maxInFlight,
      cache: opts.cache,
      aio: opts.aio,
      multifd: merger,
      returnPath: mode === 'background' ? undefined : returnPath,
      // The stream's own end (VMDESCRIPTION) tells us it is complete; QEMU
      // is only waiting for our SHUT.
      quietMs: 50,
      signal: stopSave.signal,
      onFileOpen: () => fileOpen(),
      onProgress: (bytes, pages) => {
        // The main stream's bytes and, with multifd, the channels'.
        streamBytes = bytes + (merger?.channelBytes ?? 0);
        pageRecords = pages;
        report();
      },
    }));
    const saved = saving.then(
      (r) => ({ ok: true as const, r }),
      (err: Error) => ({ ok: false as const, err }),
    );

    // The image file is opened before QEMU starts sending: opened after, it
    // waited behind the parsing of the first megabytes (~50 ms with QEMU
    // blocked). multifd: the save starts only once QEMU connects.
    if (!merger) await Promise.race([fileOpened, saved]);
    await qmp.execute('migrate', { uri }).catch((err: Error) => {
      stopSave.abort(err);
      throw new QmpSaveError('qemu', `QEMU refused the migration: ${err.message}`);
    });
    fdName = null; // QEMU owns it now
    migrating = true;

    // QEMU reaching a final status, the save ending, or the connection going.
    const qemuDone = waitMigration(qmp, isTerminal, { onInfo: (i) => ((info = i), report()) }).then(
      (i) => ({ ok: true as const, i }),
      (err: Error) => ({ ok: false as const, err }),
    );
    const first = await Promise.race([saved.then((s) => ({ from: 'save' as const, s })), qemuDone.then((q) => ({ from: 'qemu' as const, q }))]);

    if (first.from === 'save' && !first.s.ok) {
      // A migration cancelled by someone else ends our input first: QEMU's
      // status says so (we have not cancelled anything yet).
      // A QEMU that died ends our input too, often before its QMP socket's
      // end is read: no answer here is QEMU gone, not a bad stream.
      const now = opts.signal?.aborted ? null : await qmp.execute<MigrationInfo>('query-migrate').catch((err: Error) => err);
      if (now instanceof Error) {
        failure = new QmpSaveError('qemu', `QEMU went away during the save: ${now.message}; no image was written`);
      } else if (now?.status === 'cancelling' || now?.status === 'cancelled') {
        failure = new QmpSaveError('qemu', `QEMU reports the migration cancelled: ${now['error-desc'] ?? 'by another QMP client'}; no image was kept`);
      } else {
        // Our side failed (or SIGINT): QEMU must not go on.
        failure = sideError(first.s.err, opts.signal);
        await cancel(qmp);
      }
    } else if (first.from === 'qemu' && !first.q.ok) {
      stopSave.abort(first.q.err);
      await saved;
      failure = new QmpSaveError('qemu', `QEMU went away during the save: ${first.q.err.message}; no image was written`);
    } else {
      const q = await qemuDone;
      if (!q.ok) {
        stopSave.abort(q.err);
        const s = await saved;
        failure = s.ok ? new QmpSaveError('qemu', `QEMU went away after the save: ${q.err.message}`) : new QmpSaveError('qemu', `QEMU went away during the save: ${q.err.message}; no image was written`);
      } else if (q.i.status !== 'completed') {
        // failed or cancelled by QEMU (or by someone else): drop what we have.
        stopSave.abort(new QemuSnapError(`QEMU ${q.i.status} the migration`));
        const s = await saved;
        if (s.ok) await fs.promises.unlink(s.r.imagePath).catch(() => undefined);
        const why = q.i['error-desc'] ?? (s.ok ? 'no reason given' : s.err.message);
        failure = new QmpSaveError('qemu', `QEMU reports the migration ${q.i.status}: ${why}; no image was kept`);
      } else {
        migrating = false;
        // Completed. Without a return path (background) QEMU does not wait
        // for us: the image may still be finishing.
        const s = await saved;
        if (!s.ok) failure = sideError(s.err, opts.signal, true);
        else result = { ...s.r, streamBytes: s.r.streamBytes + (merger?.channelBytes ?? 0), migration: q.i, runState: before, wallMs: performance.now() - t0 };
      }
    }
  } catch (err) {
    failure ??= err instanceof QmpSaveError ? err : err instanceof QmpError ? new QmpSaveError('qemu', err.message) : sideError(err as Error, opts.signal);
    if (migrating) await cancel(qmp).catch(() => undefined);
  } finally {
    opts.signal?.removeEventListener('abort', onOuterAbort);
    // Our ends of the channels first: a multifd thread of QEMU blocked
    // writing to a channel we stopped reading holds a cancelled migration
    // in `cancelling` (seen on 7.2) until the socket goes.
    await listener?.close().catch(() => undefined);
    if (!qmp.closed) {
      // Put things back even after a failure; a failure to do so is reported.
      try {
        if (fdName) await closeFd(qmp, fdName);
        await waitMigration(qmp, (s) => !isInProgress(s), { timeoutMs: 15_000, pollMs: 50 });
        await settings.restore();
        const wantRunning = result ? mode !== 'stop' && before.running : before.running;
        const now = await qmp.execute<RunState>('query-status');
        if (wantRunning && !now.running) await qmp.execute('cont');
        if (!wantRunning && now.running && (stoppedByUs || result)) await qmp.execute('stop');
        if (result) result.runState = await qmp.execute<RunState>('query-status');
      } catch (err) {
        failure ??= new QmpSaveError('qemu', `restoring QEMU's state after the save: ${(err as Error).message}`);
      }
    }
    if (ours >= 0) {
      try {
        fs.closeSync(ours);
      } catch {
        // already closed
      }
    }
  }
  if (failure || !result) throw failure ?? new QmpSaveError('qemu-snap', 'save ended without a result');
  return result;
}

/**
 * PONG and SHUT go back on our end of the socketpair. A write that fails
 * means QEMU closed its end (it cancelled, failed or quit): the outcome is
 * read from QEMU and from the save, so the error is only swallowed here.
 */
function returnPathWriter(fd: number): NodeJS.WritableStream {
  const w = new FdWriter(fd);
  w.on('error', () => undefined);
  return w as unknown as NodeJS.WritableStream;
}

function sideError(err: Error, signal: AbortSignal | undefined, qemuCompleted = false): QmpSaveError {
  const qemu = qemuCompleted ? 'QEMU completed its side' : "QEMU's migration cancelled";
  if (signal?.aborted) return new QmpSaveError('interrupted', `save interrupted (${String(signal.reason ?? 'aborted')}): ${qemu}, no image written`);
  return new QmpSaveError('qemu-snap', `qemu-snap failed: ${err.message}; ${qemu}, no image written`);
}

async function cancel(qmp: QmpClient): Promise<void> {
  if (qmp.closed) return;
  await qmp.execute('migrate_cancel').catch(() => undefined);
}
