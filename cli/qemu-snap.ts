#!/usr/bin/env node
// qemu-snap: save a QEMU VM's migration stream into a QCOW2 snapshot image,
// restore it, describe it. A thin layer over the library: argument parsing,
// exit codes (0 ok, 1 runtime failure, 2 usage), progress and one-line errors.
import minimist from 'minimist';
import { readFileSync, fstatSync, writeSync } from 'node:fs';
import { isatty } from 'node:tty';
import { setFlagsFromString } from 'node:v8';
import { QemuSnapError } from '../src/errors';
import { UsageError, parseSize } from '../src/util/size';
import { ProgressLine, ProgressMode } from '../src/util/progress';
import { saveProgress, loadProgress, verifyProgress } from '../src/snapshot/progress-state';
// Each command loads its own modules (below, with import()): a restore
// should not pay for compiling the save pipeline, and the reverse.
import { cacheOptions } from './cache-args';
import { FdWriter, isPipe, makeNonBlocking } from '../src/util/fd-writer';
import { native } from '../src/util/native';
import { FdReader } from '../src/util/fd-reader';
import { enlargePipe } from '../src/util/pipe-size';
import { formatBytes } from '../src/util/size';
import { REFUSAL_NOTICE } from '../src/snapshot/refusal';
import { QMP_USAGE, wantsQmp, cmdSaveQmp, cmdRestoreQmp } from './qmp-commands';
import { rfcArguments, printVersion } from './rfc-args';

// The per-page records die young: a smaller young generation (V8's default
// lets it grow to 16 MiB per semi-space) keeps peak RSS about 25 MiB lower
// for the same speed.
setFlagsFromString('--max-semi-space-size=8');

// process.stdout is created on first use (for a pipe that also makes fd 1
// non-blocking): create it, and its error handler, only when needed.
let stdoutUsed = false;
function stdout(): NodeJS.WriteStream {
  if (!stdoutUsed) {
    stdoutUsed = true;
    process.stdout.on('error', (err) => {
      // Not a system error: the pipeline tore stdout down after its own
      // failure (an interrupt, a bad image), which main() reports.
      if (!/^E[A-Z0-9]+$/.test(String((err as NodeJS.ErrnoException).code))) return;
      // A closed stdout (EPIPE) must end the run with exit 1, not a crash.
      const code = (err as NodeJS.ErrnoException).code;
      process.stderr.write(`qemu-snap: ${loadStreamBytes && isReaderGone(code) ? destinationClosed(loadStreamBytes(), code) : `stdout: ${code === 'EPIPE' ? 'the reader closed the pipe (EPIPE)' : err.message}`}\n`);
      process.exit(1);
    });
  }
  return process.stdout;
}

/**
 * While `load` runs with a consumer (a pipe or a socket) on stdout: how many
 * stream bytes went out. A load that fails before the first byte sends the
 * consumer the refusal notice (src/snapshot/refusal.ts), so a destination
 * QEMU fails at once instead of waiting for ever.
 */
let loadStreamBytes: (() => number) | null = null;

/** A pipe or a socket: something that reads what we write as it comes, not a file. */
function isConsumer(fd: number): boolean {
  try {
    const st = fstatSync(fd);
    return st.isFIFO() || st.isSocket();
  } catch {
    return false;
  }
}

function isRegularFile(fd: number): boolean {
  try {
    return fstatSync(fd).isFile();
  } catch {
    return false;
  }
}

function isReaderGone(code: unknown): boolean {
  return code === 'EPIPE' || code === 'ECONNRESET';
}

/** What to say when the consumer of load's stream went away. */
function destinationClosed(bytes: number, code: unknown): string {
  return `the destination closed the stream after ${formatBytes(bytes)} (${String(code)} on stdout): a destination QEMU logs its reason on its stderr or log (e.g. "Size mismatch" for a different -m, "Machine type received is ..." for another -machine)`;
}

/** A failed load owes a consumer that got nothing the refusal notice. */
function refuseConsumer(): void {
  if (!loadStreamBytes || loadStreamBytes() > 0) return;
  loadStreamBytes = null;
  try {
    writeSync(1, REFUSAL_NOTICE);
  } catch {
    // The consumer is gone or its pipe is full: it will not wait on us.
  }
}

const USAGE = `usage:
  qemu-snap save [options] IMAGE     migration stream on stdin → snapshot IMAGE
      -i, --input FILE        read the stream from FILE instead of stdin
      -S, --page-size SIZE    page size when the stream does not say (default 4096)
      --cluster-size SIZE     QCOW2 cluster size, 64K..2M (default 1M)
      --max-in-flight N       block writes outstanding (default 8)
      -f, --force             replace an existing IMAGE
      -s, --image-size SIZE   refuse a stream whose guest RAM is larger than SIZE
      --cache=MODE            host cache: writeback (default), none, writethrough,
                              directsync, unsafe (QEMU's meanings; none and directsync
                              bypass the page cache with O_DIRECT, unsafe never fsyncs)
      -n, --nocache           --cache=none
      --aio=MODE              I/O engine of the O_DIRECT writes: threads (default), native
                              (Linux AIO) or io_uring, N requests in the kernel; native and
                              io_uring need --cache=none or directsync (as QEMU's aio=native)
  qemu-snap load [options] IMAGE     snapshot IMAGE → migration stream on stdout
      -o, --output FILE       write the stream to FILE instead of stdout
      -S, --page-size SIZE    refuse an image whose page size differs
      --max-in-flight N       block reads outstanding (default 8)
      -p, --postcopy PCT      start the VM after PCT% of the data pages, page in the rest
                              on demand (the destination needs the postcopy-ram capability)
      --host-page-size [BLOCK=]SIZE[,...]
                              the destination's host page size (hugepage-backed RAM) for
                              postcopy, when the stream did not record it: for BLOCK, or
                              for every block whose length is a multiple of SIZE
      --no-verify             do not check RAM against the image's digests
      -s, --image-size SIZE   refuse an image whose guest RAM is larger than SIZE
      --cache=MODE, -n, --aio=MODE   as for save: none/directsync read with O_DIRECT,
                              N reads in flight, leaving the page cache untouched
  qemu-snap info [--json] FILE|-     describe a snapshot image or a raw migration stream
  qemu-snap verify IMAGE             check an image's structure and RAM digests without a VM
common options:
  --progress / --no-progress  progress on stderr (default: when stderr is a terminal)
  -q, --quiet                 no messages but errors
  -h, --help                  this text
driving QEMU over QMP (give qemu-snap a -qmp socket of its own: QEMU serves one client per socket):
${QMP_USAGE}
the RFC's form: qemu-snap [-s SIZE] [-S SIZE] [-p PCT] [-V] [-h] save|load FILE`;

// QEMU_SNAP_STATS=1: one JSON line of figures on stderr at exit, for the benchmarks.
const wantStats = process.env.QEMU_SNAP_STATS === '1';
const startedAt = performance.now();
let stats: Record<string, unknown> = {};

interface CommonFlags {
  quiet: boolean;
  progress: boolean;
}

/** In place on a terminal; plain lines every few seconds into a file or a pipe. */
function progressMode(common: CommonFlags): ProgressMode {
  return !common.progress ? 'off' : process.stderr.isTTY === true ? 'tty' : 'lines';
}

function fail(message: string): never {
  throw new UsageError(message);
}

function parse(argv: string[], spec: { string?: string[]; boolean?: string[]; alias?: Record<string, string>; default?: Record<string, boolean> }) {
  const known = new Set<string>();
  for (const k of [...(spec.string ?? []), ...(spec.boolean ?? []), 'progress', 'quiet', 'help']) known.add(k);
  for (const [k, v] of Object.entries({ ...(spec.alias ?? {}), q: 'quiet', h: 'help' })) {
    known.add(k);
    known.add(v);
  }
  const args = minimist(argv, {
    string: spec.string ?? [],
    boolean: [...(spec.boolean ?? []), 'progress', 'quiet', 'help'],
    alias: { ...(spec.alias ?? {}), q: 'quiet', h: 'help' },
    default: { progress: undefined, ...(spec.default ?? {}) },
    unknown: (arg: string) => {
      if (arg.startsWith('-') && arg !== '-') {
        const name = arg.replace(/^--?(no-)?/, '').replace(/=.*$/, '');
        if (!known.has(name)) fail(`unknown option ${arg}`);
      }
      return true;
    },
  });
  const common: CommonFlags = {
    quiet: args.quiet === true,
    // minimist gives an absent boolean false, not undefined: look for the flag itself.
    progress: argv.some((a) => /^--(no-)?progress$/.test(a)) ? args.progress === true : process.stderr.isTTY === true,
  };
  if (common.quiet) common.progress = false;
  return { args, common };
}

function oneString(v: unknown, what: string): string | undefined {
  if (v === undefined) return undefined;
  if (Array.isArray(v)) fail(`${what} given more than once`);
  if (typeof v !== 'string' || v === '') fail(`${what} needs a value`);
  return v;
}

function positiveInt(v: unknown, what: string): number | undefined {
  const s = oneString(v, what);
  if (s === undefined) return undefined;
  if (!/^\d+$/.test(s) || Number(s) < 1 || Number(s) > 1024) fail(`${what}: '${s}' is not a whole number from 1 to 1024`);
  return Number(s);
}

function onePositional(args: minimist.ParsedArgs, what: string): string {
  const rest = args._.map(String);
  if (rest.length === 0) fail(`missing ${what}`);
  if (rest.length > 1) fail(`unexpected argument '${rest[1]}'`);
  return rest[0];
}

/**
 * How long cleanup may take after SIGINT/SIGTERM before the process ends
 * anyway: the promise is an exit within 1 s, whatever the work was blocked in.
 */
const INTERRUPT_GRACE_MS = 700;
/** Set once the one line on stderr has been written. */
let reported = false;
/** -s/--image-size SIZE (the RFC's): the most guest RAM the image may hold. */
function imageSizeArg(args: minimist.ParsedArgs): number | undefined {
  const v = oneString(args['image-size'], '--image-size');
  return v === undefined ? undefined : parseSize(v, '--image-size');
}

/** SIGINT/SIGTERM/SIGPIPE abort the work: cleanup runs, then exit 1. */
function abortOnSignals(what: string): AbortController {
  const ac = new AbortController();
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGPIPE', 'SIGHUP'] as const) {
    process.on(sig, () => {
      if (ac.signal.aborted) return;
      ac.abort(sig);
      // Cleanup that does not finish in time (a peer that never answers)
      // must not keep the process: say what happened and go.
      setTimeout(() => {
        if (!reported) writeErrorLine(`qemu-snap: ${what} interrupted (${sig})`);
        hardExit(1);
      }, INTERRUPT_GRACE_MS).unref();
    });
  }
  return ac;
}

/**
 * info and verify write nothing but their report: a signal ends them at
 * once, with the same exit code and one line as save and load.
 */
function exitOnSignals(what: string): void {
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      if (!reported) writeErrorLine(`qemu-snap: ${what} interrupted (${sig})`);
      hardExit(1);
    });
  }
}

function writeErrorLine(line: string): void {
  reported = true;
  process.stderr.write(`${line}\n`);
}

/**
 * Exit now, without joining threads: a worker or a pool thread blocked in a
 * system call (an idle or full pipe) would otherwise hold process.exit.
 * Node's own exit without the native module.
 */
function hardExit(code: number): void {
  const mod = native();
  if (mod) mod.exitNow(code);
  process.exit(code);
}

async function cmdSave(argv: string[]): Promise<void> {
  const { args, common } = parse(argv, {
    string: ['input', 'page-size', 'cluster-size', 'max-in-flight', 'image-size', 'cache', 'aio'],
    boolean: ['force', 'nocache'],
    alias: { i: 'input', S: 'page-size', f: 'force', s: 'image-size', n: 'nocache' },
  });
  if (args.help) return void stdout().write(USAGE + '\n');
  const image = onePositional(args, 'IMAGE (the snapshot file to write)');
  const pageSizeArg = oneString(args['page-size'], '--page-size');
  const clusterArg = oneString(args['cluster-size'], '--cluster-size');
  const pageSize = pageSizeArg === undefined ? undefined : parseSize(pageSizeArg, '--page-size');
  const clusterSize = clusterArg === undefined ? undefined : parseSize(clusterArg, '--cluster-size');
  if (clusterSize !== undefined && (clusterSize < 65536 || clusterSize > 2 << 20 || (clusterSize & (clusterSize - 1)) !== 0)) {
    fail(`--cluster-size: ${clusterArg} is not a power of two from 64K to 2M`);
  }
  if (pageSize !== undefined && (pageSize < 512 || pageSize > 65536 || (pageSize & (pageSize - 1)) !== 0)) {
    fail(`--page-size: ${pageSizeArg} is not a power of two from 512 to 64K`);
  }
  const maxInFlight = positiveInt(args['max-in-flight'], '--max-in-flight');
  const { cache, aio } = cacheOptions(args);
  const inputPath = oneString(args.input, '--input');
  const fromStdin = inputPath === undefined || inputPath === '-';
  if (fromStdin && isatty(0)) fail('refusing to read a migration stream from a terminal: run it under QEMU (migrate "exec:qemu-snap save IMAGE") or use --input FILE');
  // A 1 MiB pipe instead of 64 KiB: 16 times fewer sleeps and wake-ups between the writer and us.
  const pipeSize = fromStdin && isPipe(0) ? (enlargePipe(0) ?? undefined) : undefined;
  // A pipe is read on a worker thread in 1 MiB pieces: Node's own reads of
  // a pipe cost more than the parsing (QEMU_SNAP_PIPE_THREAD=0 turns it off).
  const input: NodeJS.ReadableStream = !fromStdin
    ? (await import('node:fs')).createReadStream(inputPath, { highWaterMark: 1 << 20 })
    : isPipe(0) && process.env.QEMU_SNAP_PIPE_THREAD !== '0'
      ? (new FdReader(0, { pipeSize }) as unknown as NodeJS.ReadableStream)
      : process.stdin;
  const progress = new ProgressLine('save', progressMode(common));
  const ac = abortOnSignals('save');
  try {
    const { saveSnapshot } = await import('../src/snapshot/save');
    const r = await saveSnapshot(input, image, {
      pageSize,
      clusterSize,
      maxInFlight,
      force: args.force === true,
      maxRamSize: imageSizeArg(args),
      cache,
      aio,
      returnPath: stdout(),
      signal: ac.signal,
      onProgress: (bytes, _pages, summary) => progress.update(saveProgress(bytes, summary)),
    });
    // The final line: no stage (the stream is complete, whatever pass it was in).
    progress.done({ ...saveProgress(r.streamBytes, r), stage: undefined });
    stats = { cmd: 'save', streamBytes: r.streamBytes, dataPages: r.dataPages };
    if (!common.quiet) {
      process.stderr.write(`qemu-snap: saved ${r.imagePath}: ${r.dataPages} data pages, ${r.blocks.length} RAM blocks, ${r.deviceStateLength} bytes of device state\n`);
    }
  } catch (err) {
    progress.clear();
    // The reader thread may be blocked on an idle pipe: end it, or the exit waits for the writer.
    if (input instanceof FdReader) input.destroy();
    throw err;
  }
}

async function cmdLoad(argv: string[]): Promise<void> {
  // Set before the arguments are parsed: a usage error is a refusal too.
  if (isConsumer(1)) loadStreamBytes = () => 0;
  const { args, common } = parse(argv, {
    string: ['output', 'page-size', 'max-in-flight', 'postcopy', 'host-page-size', 'image-size', 'cache', 'aio'],
    boolean: ['verify', 'nocache'],
    default: { verify: true },
    alias: { o: 'output', S: 'page-size', p: 'postcopy', s: 'image-size', n: 'nocache' },
  });
  if (args.help) return void stdout().write(USAGE + '\n');
  const image = onePositional(args, 'IMAGE (the snapshot to load)');
  const pageSizeArg = oneString(args['page-size'], '--page-size');
  const pageSize = pageSizeArg === undefined ? undefined : parseSize(pageSizeArg, '--page-size');
  const maxInFlight = positiveInt(args['max-in-flight'], '--max-in-flight');
  const { cache, aio } = cacheOptions(args);
  const pctArg = oneString(args.postcopy, '--postcopy');
  let postcopy: number | undefined;
  if (pctArg !== undefined) {
    if (!/^\d+(\.\d+)?$/.test(pctArg) || Number(pctArg) > 100) fail(`--postcopy: '${pctArg}' is not a percentage from 0 to 100`);
    postcopy = Number(pctArg);
  }
  const hostArg = oneString(args['host-page-size'], '--host-page-size');
  const hostPageSizes = hostArg === undefined
    ? undefined
    : hostArg.split(',').map((item) => {
        const eq = item.lastIndexOf('=');
        return eq < 0 ? { size: parseSize(item, '--host-page-size') } : { block: item.slice(0, eq), size: parseSize(item.slice(eq + 1), '--host-page-size') };
      });
  const outputPath = oneString(args.output, '--output');
  if (outputPath !== undefined) loadStreamBytes = null;
  // Postcopy talks with the destination both ways: a file cannot answer.
  if (postcopy !== undefined && outputPath !== undefined) fail('--postcopy needs the destination QEMU on stdout and its return path on stdin: it cannot write to a file (--output)');
  if (postcopy !== undefined && !isatty(1) && !isConsumer(1)) fail('--postcopy needs the destination QEMU on stdout (a pipe or a socket, as -incoming "exec:..." gives) and its return path on stdin: stdout is a file, not a pipe or a socket');
  if (outputPath === undefined && isatty(1)) fail('refusing to write a migration stream to a terminal: pipe it to QEMU (-incoming "exec:qemu-snap load IMAGE") or use --output FILE');
  if (outputPath === undefined && isPipe(1)) {
    enlargePipe(1);
    // Written synchronously: a full pipe must give EAGAIN, not a sleep no signal ends.
    makeNonBlocking(1);
  }
  const progress = new ProgressLine('load', progressMode(common));
  const ac = abortOnSignals('load');
  try {
    const { loadSnapshot } = await import('../src/snapshot/load');
    // A pipe (QEMU's exec:, a shell pipe) or a file (`> F`) is written by
    // descriptor: synchronously from the reads in precopy, from the thread
    // pool in postcopy. Sockets keep Node's stream.
    const out = outputPath !== undefined ? undefined : isPipe(1) || isRegularFile(1) ? new FdWriter(1) : stdout();
    if (out && loadStreamBytes) loadStreamBytes = () => out.bytesWritten;
    const r = await loadSnapshot(image, {
      output: outputPath,
      stdout: out as NodeJS.WritableStream | undefined,
      pageSize,
      maxInFlight,
      cache,
      aio,
      postcopy,
      hostPageSizes,
      verify: args.verify !== false,
      maxRamSize: imageSizeArg(args),
      returnPath: postcopy === undefined ? undefined : process.stdin,
      signal: ac.signal,
      onProgress: (bytes, _pages, state) => progress.update(loadProgress(bytes, state)),
    });
    progress.done(loadProgress(r.streamBytes, r));
    stats = { cmd: 'load', streamBytes: r.streamBytes, dataPages: r.dataPagesSent, requests: r.requests };
    if (!common.quiet && outputPath !== undefined) process.stderr.write(`qemu-snap: wrote ${r.streamBytes} bytes of stream to ${outputPath}\n`);
  } catch (err) {
    progress.clear();
    // A destination that stopped reading has a reason of its own, which it logs.
    const code = (err as NodeJS.ErrnoException).code;
    if (loadStreamBytes && isReaderGone(code)) throw new QemuSnapError(destinationClosed(loadStreamBytes(), code));
    throw err;
  }
}

async function cmdInfo(argv: string[]): Promise<void> {
  const { args, common } = parse(argv, { boolean: ['json'] });
  if (args.help) return void stdout().write(USAGE + '\n');
  const file = onePositional(args, 'FILE (a snapshot image, a stream file, or - for stdin)');
  exitOnSignals('info');
  const { describeFile, formatInfo } = await import('../src/snapshot/info');
  const progress = new ProgressLine('info', progressMode(common));
  const info = await describeFile(file, (bytes, pages) => progress.update({ covered: bytes, total: 0, moved: bytes, noun: 'of input', detail: `${pages} page records` })).finally(() => progress.clear());
  stdout().write(args.json ? JSON.stringify(info, null, 2) + '\n' : formatInfo(info));
}

async function cmdVerify(argv: string[]): Promise<void> {
  const { args, common } = parse(argv, {});
  if (args.help) return void stdout().write(USAGE + '\n');
  const image = onePositional(args, 'IMAGE (the snapshot to check)');
  exitOnSignals('verify');
  const { verifySnapshot } = await import('../src/snapshot/verify');
  const progress = new ProgressLine('verify', progressMode(common));
  let last: Parameters<typeof verifyProgress> = [0, 0, 0, 0];
  let r: Awaited<ReturnType<typeof verifySnapshot>>;
  try {
    r = await verifySnapshot(image, {
      onProgress: (...figures) => {
        last = figures;
        progress.update(verifyProgress(...figures));
      },
    });
  } catch (err) {
    progress.clear();
    throw err;
  }
  if (last[1] > 0) progress.done(verifyProgress(...last));
  if (!common.quiet) process.stderr.write(`qemu-snap: ${image}: ${r.summary}\n`);
}

async function main(argvIn: string[]): Promise<number> {
  // Until the arguments are parsed, a load is any command line naming it.
  let cmd: string | undefined = argvIn.includes('load') ? 'load' : undefined;
  try {
    // The RFC's order, options before the command: moved after it.
    const argv = rfcArguments(argvIn);
    cmd = argv[0];
    const rest = argv.slice(1);
    switch (cmd) {
      case 'save':
        if (wantsQmp(rest)) await cmdSaveQmp(rest, () => void stdout().write(USAGE + '\n'));
        else await cmdSave(rest);
        break;
      case 'restore':
        await cmdRestoreQmp(rest, () => void stdout().write(USAGE + '\n'));
        break;
      case '-V':
      case '--version':
        printVersion(stdout());
        return 0;
      case 'load':
        await cmdLoad(rest);
        break;
      case 'info':
        await cmdInfo(rest);
        break;
      case 'verify':
        await cmdVerify(rest);
        break;
      case '-h':
      case '--help':
      case 'help':
        stdout().write(USAGE + '\n');
        return 0;
      case undefined:
        fail('missing command (save, load, restore, info, verify)');
        break;
      default:
        fail(`unknown command '${cmd}'`);
    }
    return 0;
  } catch (err) {
    const code = report(err);
    if (cmd === 'load') refuseConsumer();
    return code;
  }
}

/** Whatever a message holds, it stays one line. */
function oneLine(message: string): string {
  return message.replace(/[\x00-\x1f\x7f]+/g, ' ');
}

function report(err: unknown): number {
  reported = true;
  if (err instanceof UsageError) {
    process.stderr.write(`qemu-snap: ${oneLine(err.message)}\n${'try: qemu-snap --help'}\n`);
    return 2;
  }
  if (err instanceof QemuSnapError) {
    process.stderr.write(`qemu-snap: ${oneLine(err.message)}\n`);
    return 1;
  }
  const e = err as NodeJS.ErrnoException;
  if (e && typeof e.code === 'string') {
    // System errors: name the file and the reason, no stack.
    const where = e.path ? `${e.path}: ` : '';
    process.stderr.write(`qemu-snap: ${oneLine(where + (e.code === 'EPIPE' ? 'the reader closed the pipe (EPIPE)' : e.message.replace(/^\w+: /, '')))}\n`);
    return 1;
  }
  process.stderr.write(`qemu-snap: internal error: ${oneLine(e?.message ?? String(err))}\n`);
  if (process.env.QEMU_SNAP_DEBUG) process.stderr.write(`${e?.stack ?? ''}\n`);
  return 1;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
    // stdin may still be open (a return path); nothing more is owed to it.
    flushAndExit(code);
  },
  (err) => flushAndExit(report(err)),
);

// VmHWM, not getrusage: ru_maxrss survives exec, so under QEMU's exec: it
// reports the resident size of the QEMU process that forked us.
function peakRssKiB(): number {
  try {
    const m = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m) return Number(m[1]);
  } catch {
    // not Linux: fall back
  }
  return process.resourceUsage().maxRSS;
}

function flushAndExit(code: number): void {
  if (wantStats) {
    const line = { ...stats, code, ms: Math.round(performance.now() - startedAt), maxRssKiB: peakRssKiB() };
    process.stderr.write(`qemu-snap-stats: ${JSON.stringify(line)}\n`);
  }
  // After a failure nothing is owed to anyone: threads still blocked in a
  // pipe must not hold the exit.
  const done = () => (code === 0 ? process.exit(code) : hardExit(code));
  // Only a success owes the reader its last bytes: after a failure (an
  // interrupt while the reader stalls) waiting for a drain could be forever,
  // and a destroyed stdout never drains.
  if (code === 0 && stdoutUsed && !process.stdout.destroyed && process.stdout.writableLength > 0) process.stdout.once('drain', done);
  else setImmediate(done);
}
