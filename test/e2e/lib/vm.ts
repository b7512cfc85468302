import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { QemuSnapError } from '../../../src/errors';
import { Qmp, QmpTimeoutError, sleep } from './qmp';

export const QEMU_BINARY = process.env.QEMU_SNAP_QEMU ?? 'qemu-system-x86_64';
/** qemu-img of the same QEMU generation as QEMU_BINARY (scripts/install-qemu.sh sets both for 10.0). */
export const QEMU_IMG = process.env.QEMU_SNAP_QEMU_IMG ?? 'qemu-img';

export type Machine = 'pc' | 'q35';
export type Accel = 'kvm' | 'tcg';

/** QEMU could not be started, or died, or did something we did not expect. */
export class QemuProcessError extends QemuSnapError {
  constructor(readonly vmName: string, detail: string, readonly stderr = '') {
    super(`QEMU ${vmName}: ${detail}${stderr ? ` (stderr: ${stderr.trim().split('\n').slice(-3).join(' | ')})` : ''}`);
  }
}

/** A migration ended in failed/cancelled, or did not finish in time. */
export class MigrationError extends QemuSnapError {
  constructor(readonly vmName: string, readonly status: string, detail: string) {
    super(`migration on ${vmName} ${status}: ${detail}`);
  }
}

/** One file to place into guest RAM at start-up with `-device loader`. */
export interface RamLoad {
  file: string;
  addr: number;
}

export interface VmOptions {
  machine?: Machine;
  memMiB?: number;
  /** Start with -S (CPUs stopped). Default true: tests want a quiet VM. */
  paused?: boolean;
  /** `-incoming` URI, e.g. "defer" or "exec:cat FILE". */
  incoming?: string;
  loads?: RamLoad[];
  /** Force an accelerator; default: KVM if /dev/kvm opens, else TCG (env QEMU_SNAP_ACCEL=tcg forces TCG). */
  accel?: Accel;
  extraArgs?: string[];
  /** Label used in error messages. */
  name?: string;
  /** How long to wait for QMP to come up (ms). */
  startTimeoutMs?: number;
}

/** Subset of query-migrate we look at; QEMU returns more. */
export interface MigrationInfo {
  status?: string;
  'total-time'?: number;
  'downtime'?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    duplicate: number;
    normal: number;
    'normal-bytes': number;
    'dirty-sync-count': number;
    'page-size': number;
    mbps: number;
    'postcopy-requests'?: number;
    [k: string]: unknown;
  };
  [k: string]: unknown;
}

export interface StatusInfo {
  running: boolean;
  singlestep?: boolean;
  status: string;
}

export interface MigrateOptions {
  /** Bytes per second; QEMU's default of 128 MiB/s makes big VMs crawl. */
  maxBandwidth?: number;
  /** migrate-set-capabilities before migrating, e.g. { 'postcopy-ram': true }. */
  capabilities?: Record<string, boolean>;
  /** Reject if not completed by then (ms). */
  timeoutMs?: number;
}

let kvmUsable: boolean | undefined;

/** KVM is usable when /dev/kvm opens read-write (the permission QEMU needs), unless QEMU_SNAP_ACCEL=tcg. */
export function defaultAccel(): Accel {
  if (process.env.QEMU_SNAP_ACCEL === 'tcg') return 'tcg';
  if (kvmUsable === undefined) {
    try {
      fs.closeSync(fs.openSync('/dev/kvm', 'r+'));
      kvmUsable = true;
    } catch {
      kvmUsable = false;
    }
  }
  return kvmUsable ? 'kvm' : 'tcg';
}

/** Throws a clear error when the QEMU binary is missing, so tests fail rather than skip. */
export function requireQemu(binary = QEMU_BINARY): string {
  const r = spawnSync(binary, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    throw new QemuProcessError(binary, `cannot run ${binary} --version (${r.error?.message ?? `exit ${r.status}`}): install qemu-system-x86 to run the e2e tests`);
  }
  return r.stdout.split('\n')[0];
}

// Safety net: whatever a test does, no QEMU outlives the node process.
const live = new Map<ChildProcess, string>();
let exitHookInstalled = false;
function track(child: ChildProcess, dir: string): void {
  live.set(child, dir);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const [c, dir] of live) {
        try {
          c.kill('SIGKILL');
          fs.rmSync(dir, { recursive: true, force: true });
        } catch {
          // already gone
        }
      }
    });
    for (const sig of ['SIGINT', 'SIGTERM'] as const) {
      process.once(sig, () => process.exit(130));
    }
  }
}

/** The argv startVm would run (without the binary), for documentation and reuse. */
export function qemuArgs(opts: VmOptions, qmpSocket: string): string[] {
  const machine = opts.machine ?? 'pc';
  const accel = opts.accel ?? defaultAccel();
  const args = [
    '-machine', `${machine},accel=${accel}`,
    '-m', String(opts.memMiB ?? 512),
    '-display', 'none',
    '-nodefaults',
    '-no-user-config',
    '-qmp', `unix:${qmpSocket},server=on,wait=off`,
  ];
  if (opts.paused ?? true) args.push('-S');
  if (opts.incoming) args.push('-incoming', opts.incoming);
  for (const l of opts.loads ?? []) {
    // The loader's property parser splits on commas; a comma in a path would need doubling.
    args.push('-device', `loader,file=${l.file.replace(/,/g, ',,')},addr=0x${l.addr.toString(16)},force-raw=on`);
  }
  args.push(...(opts.extraArgs ?? []));
  return args;
}

/** Start QEMU and connect QMP. The caller must `await vm.stop()` (or kill) in a finally. */
export async function startVm(opts: VmOptions = {}): Promise<Vm> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-vm-'));
  const sock = path.join(dir, 'qmp.sock');
  const args = qemuArgs(opts, sock);
  const name = opts.name ?? `${opts.machine ?? 'pc'}-${process.pid}`;
  const child = spawn(QEMU_BINARY, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd: dir });
  track(child, dir);
  const vm = new Vm(name, child, dir, args);
  try {
    await vm.connect(opts.startTimeoutMs ?? 15_000);
  } catch (err) {
    await vm.kill();
    throw err;
  }
  return vm;
}

/** A running qemu-system-x86_64 with its QMP connection and temp dir. */
export class Vm {
  qmp!: Qmp;
  readonly pid: number;
  /** performance.now() when each query-migrate status was first seen by waitForMigrationStatus/migrate. */
  readonly migrationStatusSeen = new Map<string, number>();
  private stderrText = '';
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  private readonly exited: Promise<void>;
  private cleaned = false;

  constructor(readonly name: string, private readonly child: ChildProcess, readonly dir: string, readonly args: string[]) {
    if (child.pid === undefined) throw new QemuProcessError(name, `could not spawn ${QEMU_BINARY}`);
    this.pid = child.pid;
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      // Keep the tail only: a chatty QEMU must not grow memory without bound.
      this.stderrText = (this.stderrText + s).slice(-16_384);
    });
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        resolve();
      });
      child.once('error', () => {
        this.exitInfo ??= { code: null, signal: null };
        resolve();
      });
    });
  }

  get stderr(): string {
    return this.stderrText;
  }

  get hasExited(): boolean {
    return this.exitInfo !== null;
  }

  /** Resolves when the process has exited (for example after an incoming migration fails). */
  waitExit(timeoutMs: number): Promise<boolean> {
    return raceTimeout(this.exited.then(() => true), timeoutMs, false);
  }

  /** @internal used by startVm */
  async connect(timeoutMs: number): Promise<void> {
    this.qmp = await Qmp.connect(path.join(this.dir, 'qmp.sock'), {
      timeoutMs,
      onRetry: () => {
        if (this.exitInfo) throw this.diedError('exited during start-up');
      },
    }).catch((err: Error) => {
      if (this.exitInfo) throw this.diedError('exited during start-up');
      throw new QemuProcessError(this.name, err.message, this.stderrText);
    });
  }

  diedError(what: string): QemuProcessError {
    const e = this.exitInfo;
    const how = e ? (e.signal ? `signal ${e.signal}` : `exit code ${e.code}`) : 'still running';
    return new QemuProcessError(this.name, `${what} (${how}); command: ${QEMU_BINARY} ${this.args.join(' ')}`, this.stderrText);
  }

  async queryStatus(): Promise<StatusInfo> {
    return this.qmp.execute<StatusInfo>('query-status');
  }

  async queryMigrate(): Promise<MigrationInfo> {
    return this.qmp.execute<MigrationInfo>('query-migrate');
  }

  async cont(): Promise<void> {
    await this.qmp.execute('cont');
  }

  /** Run an HMP command through QMP; HMP reports errors as text, so non-empty output is returned for the caller to judge. */
  async hmp(commandLine: string): Promise<string> {
    return this.qmp.execute<string>('human-monitor-command', { 'command-line': commandLine });
  }

  /** Dump guest-physical memory; QEMU writes the file synchronously before replying, we still check its size. */
  async pmemsave(file: string, size: number, addr = 0): Promise<void> {
    await this.qmp.execute('pmemsave', { val: addr, size, filename: path.resolve(file) });
    const st = fs.statSync(file);
    if (st.size !== size) throw new QemuProcessError(this.name, `pmemsave wrote ${st.size} bytes to ${file}, expected ${size}`);
  }

  async setMigrationCapabilities(caps: Record<string, boolean>): Promise<void> {
    const capabilities = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
    if (capabilities.length) await this.qmp.execute('migrate-set-capabilities', { capabilities });
  }

  /** Start an outgoing migration. Resolves with the final query-migrate once completed. */
  async migrate(uri: string, opts: MigrateOptions = {}): Promise<MigrationInfo> {
    await this.startMigration(uri, opts);
    return this.waitForMigrationStatus('completed', opts.timeoutMs ?? 60_000);
  }

  /** Only issue the commands; for tests that watch a migration that is expected not to finish. */
  async startMigration(uri: string, opts: MigrateOptions = {}): Promise<void> {
    await this.qmp.execute('migrate-set-parameters', { 'max-bandwidth': Math.round(opts.maxBandwidth ?? 100e9) });
    if (opts.capabilities) await this.setMigrationCapabilities(opts.capabilities);
    this.migrationStatusSeen.clear();
    await this.qmp.execute('migrate', { uri });
  }

  /** Incoming side of `-incoming defer`. */
  async migrateIncoming(uri: string, capabilities?: Record<string, boolean>): Promise<void> {
    if (capabilities) await this.setMigrationCapabilities(capabilities);
    this.migrationStatusSeen.clear();
    await this.qmp.execute('migrate-incoming', { uri });
  }

  /**
   * Poll query-migrate every ~20 ms until `status` (works on source and
   * destination); records when each status was first seen. Rejects on
   * failed/cancelled (unless that is the status asked for) and on timeout.
   */
  async waitForMigrationStatus(status: string, timeoutMs = 60_000): Promise<MigrationInfo> {
    const deadline = Date.now() + timeoutMs;
    let last: MigrationInfo = {};
    for (;;) {
      if (this.exitInfo) throw this.diedError(`exited while waiting for migration status ${status}`);
      try {
        last = await this.queryMigrate();
      } catch (err) {
        if (this.exitInfo) throw this.diedError(`exited while waiting for migration status ${status}`);
        throw err;
      }
      if (last.status && !this.migrationStatusSeen.has(last.status)) this.migrationStatusSeen.set(last.status, performance.now());
      if (last.status === status) return last;
      if (last.status === 'failed' || last.status === 'cancelled') {
        throw new MigrationError(this.name, last.status, last['error-desc'] ?? 'no error-desc from QEMU');
      }
      if (Date.now() > deadline) {
        throw new MigrationError(this.name, `still ${last.status ?? 'not started'}`, `no status ${status} within ${timeoutMs} ms`);
      }
      await sleep(20);
    }
  }

  /** QMP quit, then SIGKILL if QEMU has not exited in time; always removes the temp dir. */
  async stop(timeoutMs = 5000): Promise<void> {
    if (!this.exitInfo) {
      try {
        if (this.qmp && !this.qmp.closed) {
          await raceTimeout(this.qmp.execute('quit').catch(() => undefined), timeoutMs, undefined);
        }
      } catch {
        // fall through to the kill
      }
      if (!(await this.waitExit(timeoutMs))) this.child.kill('SIGKILL');
    }
    await this.kill();
  }

  /** SIGKILL now; always removes the temp dir. */
  async kill(): Promise<void> {
    if (!this.exitInfo) {
      this.child.kill('SIGKILL');
      await this.waitExit(5000);
    }
    this.qmp?.close();
    if (!this.cleaned) {
      this.cleaned = true;
      live.delete(this.child);
      fs.rmSync(this.dir, { recursive: true, force: true });
    }
  }
}

// A timer left running would keep node alive after the tests end.
function raceTimeout<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<T>((resolve) => {
    timer = setTimeout(() => resolve(fallback), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Start a VM, run fn, and always stop it. */
export async function withVm<T>(opts: VmOptions, fn: (vm: Vm) => Promise<T>): Promise<T> {
  const vm = await startVm(opts);
  try {
    return await fn(vm);
  } finally {
    await vm.stop();
  }
}

/** An HMP command that prints nothing on success; returns wall time in ms. */
async function timedHmp(vm: Vm, command: string): Promise<number> {
  const t0 = performance.now();
  const out = await vm.hmp(command);
  const ms = performance.now() - t0;
  if (out.trim()) throw new QemuProcessError(vm.name, `${command}: ${out.trim()}`);
  return ms;
}

/** savevm through HMP; returns wall time in ms. Needs a writable qcow2 drive attached. */
export function savevmTiming(vm: Vm, tag: string): Promise<number> {
  return timedHmp(vm, `savevm ${tag}`);
}

/** loadvm through HMP; returns wall time in ms. */
export function loadvmTiming(vm: Vm, tag: string): Promise<number> {
  return timedHmp(vm, `loadvm ${tag}`);
}

/** Create a qcow2 image with qemu-img (for savevm/loadvm and as a scratch disk). */
export function createQcow2(file: string, size: string): void {
  const r = spawnSync(QEMU_IMG, ['create', '-q', '-f', 'qcow2', file, size], { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new QemuProcessError('qemu-img', `create ${file}: ${r.error?.message ?? r.stderr.trim()}`);
}

export { QmpTimeoutError };

/** `opts` with a second QMP socket at `sock`, for qemu-snap (QEMU serves one client per socket: the tests keep theirs). */
export function withSnapQmp(opts: VmOptions, sock: string): VmOptions {
  return { ...opts, extraArgs: [...(opts.extraArgs ?? []), '-qmp', `unix:${sock},server=on,wait=off`] };
}

/** The VM's migration capabilities and parameters, to check they were put back. */
export async function migrationSettings(vm: Vm): Promise<{ caps: unknown; params: unknown }> {
  return { caps: await vm.qmp.execute('query-migrate-capabilities'), params: await vm.qmp.execute('query-migrate-parameters') };
}
