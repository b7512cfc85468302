// `save --qmp SOCKET IMAGE` and `restore --qmp SOCKET IMAGE`: qemu-snap
// drives QEMU itself over a QMP socket of its own.
import minimist from 'minimist';
import { UsageError, formatBytes } from '../src/util/size';
import { ProgressLine, ProgressMode, ProgressState } from '../src/util/progress';
import { loadProgress } from '../src/snapshot/progress-state';
import type { QmpSaveProgress } from '../src/qmp/save';
import { cacheOptions } from './cache-args';

export const QMP_USAGE = `  qemu-snap save --qmp SOCKET [options] IMAGE   save the VM behind a QMP socket (live, then it runs on)
      --stop                  leave the VM stopped afterwards (like virsh save)
      --background            background-snapshot: the VM never stops for its RAM
      --downtime-limit MS     QEMU's downtime-limit for this migration
      --max-bandwidth RATE    bytes/s for this migration (default 100G: no limit to speak of)
      --channels N            migration channels (default 1): N > 1 turns on QEMU's multifd with
                              N channels, connected to a private unix socket of ours
      --cache=MODE, -n, --aio=MODE   as for save: the image's host cache and I/O engine
      -f, --force             replace an existing IMAGE
  qemu-snap restore --qmp SOCKET [options] IMAGE   restore into a QEMU started with -incoming defer (and -S)
      --postcopy PCT          run the VM after PCT% of the data pages, page in the rest
      --paused                leave the restored VM stopped
      --no-verify             do not check RAM against the image's digests
      --channels N            migration channels (default 1): N > 1 turns on the destination's multifd
                              with N channels; data pages go over them (precopy only)
      --cache=MODE, -n, --aio=MODE   as for load: none/directsync read the image with O_DIRECT`;

/** True when a save's arguments ask for the QMP-driven save. */
export function wantsQmp(argv: string[]): boolean {
  return argv.some((a) => a === '--qmp' || a.startsWith('--qmp='));
}

function parseArgs(argv: string[], strings: string[], booleans: string[], alias: Record<string, string> = {}) {
  const known = new Set([...strings, ...booleans, 'progress', 'quiet', 'help', ...Object.keys(alias), ...Object.values(alias), 'q', 'h']);
  const args = minimist(argv, {
    string: strings,
    boolean: [...booleans, 'progress', 'quiet', 'help'],
    alias: { ...alias, q: 'quiet', h: 'help' },
    default: { progress: undefined, verify: true },
    unknown: (arg: string) => {
      if (arg.startsWith('-') && arg !== '-') {
        const name = arg.replace(/^--?(no-)?/, '').replace(/=.*$/, '');
        if (!known.has(name)) throw new UsageError(`unknown option ${arg}`);
      }
      return true;
    },
  });
  const quiet = args.quiet === true;
  const wanted = !quiet && (args.progress === undefined ? process.stderr.isTTY === true : args.progress === true);
  const progress: ProgressMode = !wanted ? 'off' : process.stderr.isTTY ? 'tty' : 'lines';
  return { args, quiet, progress };
}

function one(v: unknown, what: string): string | undefined {
  if (v === undefined) return undefined;
  if (Array.isArray(v)) throw new UsageError(`${what} given more than once`);
  if (typeof v !== 'string' || v === '') throw new UsageError(`${what} needs a value`);
  return v;
}

function socketAndImage(args: minimist.ParsedArgs, what: string): { socket: string; image: string } {
  const socket = one(args.qmp, '--qmp');
  if (socket === undefined) throw new UsageError('--qmp SOCKET is required (the path of a QMP unix socket QEMU listens on)');
  const rest = args._.map(String);
  if (rest.length === 0) throw new UsageError(`missing ${what}`);
  if (rest.length > 1) throw new UsageError(`unexpected argument '${rest[1]}'`);
  return { socket: socket.replace(/^unix:/, ''), image: rest[0] };
}

function onSignals(): { signal: AbortSignal; off(): void } {
  const ac = new AbortController();
  const sigs = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
  const handler = (sig: NodeJS.Signals) => ac.abort(sig);
  for (const s of sigs) process.on(s, handler);
  return { signal: ac.signal, off: () => sigs.forEach((s) => process.off(s, handler)) };
}

/** QEMU's side of the progress line, from query-migrate. */
/** Save over QMP: QEMU's own view (sent, still dirty, pass), with our stream counts. */
function qmpSaveState(p: QmpSaveProgress): ProgressState {
  const sent = p.transferred ?? p.streamBytes;
  const iteration = p.iteration ?? 0;
  return {
    covered: sent,
    total: p.remaining === undefined ? 0 : sent + p.remaining,
    noun: 'sent (QEMU: sent + dirty)',
    moved: p.streamBytes,
    fraction: iteration > 1 ? null : undefined,
    stage: p.status === undefined ? undefined : `QEMU ${p.status}, pass ${iteration}`,
    detail: `${p.pageRecords} page records, dirty ${p.dirtyPagesRate ?? 0} pages/s`,
  };
}

export async function cmdSaveQmp(argv: string[], usage: () => void): Promise<void> {
  const { args, quiet, progress } = parseArgs(argv, ['qmp', 'downtime-limit', 'max-bandwidth', 'cluster-size', 'max-in-flight', 'page-size', 'channels', 'cache', 'aio'], ['stop', 'background', 'force', 'nocache'], { f: 'force', S: 'page-size', n: 'nocache' });
  if (args.help) return usage();
  const { socket, image } = socketAndImage(args, 'IMAGE (the snapshot file to write)');
  if (args.stop && args.background) throw new UsageError('--stop and --background exclude each other');
  const dl = one(args['downtime-limit'], '--downtime-limit');
  if (dl !== undefined && !/^\d+$/.test(dl)) throw new UsageError(`--downtime-limit: '${dl}' is not a whole number of milliseconds`);
  const { parseSize } = await import('../src/util/size');
  const cs = one(args['cluster-size'], '--cluster-size');
  const ps = one(args['page-size'], '--page-size');
  const mif = one(args['max-in-flight'], '--max-in-flight');
  const bw = one(args['max-bandwidth'], '--max-bandwidth');
  const maxBandwidth = bw === undefined ? undefined : parseSize(bw, '--max-bandwidth');
  if (maxBandwidth === 0) throw new UsageError('--max-bandwidth: must be more than 0');
  const ch = one(args.channels, '--channels');
  if (ch !== undefined && (!/^\d+$/.test(ch) || Number(ch) < 1 || Number(ch) > 64)) throw new UsageError(`--channels: '${ch}' is not a whole number from 1 to 64`);
  let channels = ch === undefined ? 1 : Number(ch);
  const { cache, aio } = cacheOptions(args);
  if (args.background && channels > 1) {
    // QEMU refuses background-snapshot together with multifd.
    if (!quiet) process.stderr.write(`qemu-snap: --background saves over one channel (QEMU cannot combine background-snapshot with multifd): --channels ${channels} ignored\n`);
    channels = 1;
  }
  const line = new ProgressLine('save', progress);
  const sig = onSignals();
  const { saveViaQmp } = await import('../src/qmp/save');
  try {
    const r = await saveViaQmp(socket, image, {
      mode: args.background ? 'background' : args.stop ? 'stop' : 'live',
      downtimeLimitMs: dl === undefined ? undefined : Number(dl),
      maxBandwidth,
      force: args.force === true,
      clusterSize: cs === undefined ? undefined : parseSize(cs, '--cluster-size'),
      pageSize: ps === undefined ? undefined : parseSize(ps, '--page-size'),
      maxInFlight: mif === undefined ? undefined : Number(mif),
      channels,
      cache,
      aio,
      signal: sig.signal,
      onProgress: (p) => line.update(qmpSaveState(p)),
    });
    const ram = r.migration.ram;
    line.done(qmpSaveState({ streamBytes: r.streamBytes, pageRecords: r.pageRecords, status: r.migration.status, transferred: ram?.transferred, remaining: ram?.remaining, dirtyPagesRate: ram?.['dirty-pages-rate'], iteration: ram?.['dirty-sync-count'] }));
    if (!quiet) {
      const m = r.migration;
      process.stderr.write(
        `qemu-snap: saved ${r.imagePath} over QMP${channels > 1 ? ` (${channels} multifd channels)` : ''} in ${Math.round(r.wallMs)} ms (QEMU total-time ${m['total-time'] ?? '?'} ms, downtime ${m.downtime ?? '?'} ms): ${r.dataPages} data pages, ${formatBytes(r.streamBytes)} of stream; the VM is ${r.runState.status}\n`,
      );
    }
  } catch (err) {
    line.clear();
    throw err;
  } finally {
    sig.off();
  }
}

export async function cmdRestoreQmp(argv: string[], usage: () => void): Promise<void> {
  const { args, quiet, progress } = parseArgs(argv, ['qmp', 'postcopy', 'max-in-flight', 'channels', 'cache', 'aio'], ['paused', 'verify', 'nocache'], { n: 'nocache' });
  if (args.help) return usage();
  const { socket, image } = socketAndImage(args, 'IMAGE (the snapshot to restore)');
  const pct = one(args.postcopy, '--postcopy');
  if (pct !== undefined && (!/^\d+(\.\d+)?$/.test(pct) || Number(pct) > 100)) throw new UsageError(`--postcopy: '${pct}' is not a percentage from 0 to 100`);
  const mif = one(args['max-in-flight'], '--max-in-flight');
  const ch = one(args.channels, '--channels');
  if (ch !== undefined && (!/^\d+$/.test(ch) || Number(ch) < 1 || Number(ch) > 64)) throw new UsageError(`--channels: '${ch}' is not a whole number from 1 to 64`);
  const channels = ch === undefined ? 1 : Number(ch);
  if (channels > 1 && pct !== undefined) throw new UsageError(`--postcopy cannot be combined with --channels ${channels}: QEMU 10.0 refuses postcopy-ram with multifd, 7.2 has no multifd in its postcopy load (use --channels 1)`);
  const { cache, aio } = cacheOptions(args);
  const line = new ProgressLine('restore', progress);
  const sig = onSignals();
  const { restoreViaQmp } = await import('../src/qmp/restore');
  try {
    const r = await restoreViaQmp(socket, image, {
      postcopy: pct === undefined ? undefined : Number(pct),
      paused: args.paused === true,
      verify: args.verify !== false,
      maxInFlight: mif === undefined ? undefined : Number(mif),
      channels,
      cache,
      aio,
      signal: sig.signal,
      onProgress: (bytes, _pages, state) => line.update(loadProgress(bytes, state)),
    });
    line.done(loadProgress(r.streamBytes, r));
    if (!quiet) {
      const running = r.runningMs === null ? 'left paused' : `running after ${Math.round(r.runningMs)} ms`;
      process.stderr.write(`qemu-snap: restored ${image} over QMP${channels > 1 ? ` (${channels} multifd channels)` : ''}: ${running}, completed after ${Math.round(r.completedMs)} ms; the VM is ${r.runState.status}\n`);
    }
  } catch (err) {
    line.clear();
    throw err;
  } finally {
    sig.off();
  }
}
