// The QMP side of a migration: its state, the capabilities and parameters
// we change for the duration (and put back), a socketpair handed to QEMU.
import * as fs from 'node:fs';
import { QemuSnapError } from '../errors';
import { native } from '../util/native';
import { QmpClient, QmpCommandError, QmpEvent } from './client';

/** What query-migrate returns (the fields we read; QEMU sends more). */
export interface MigrationInfo {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    normal: number;
    duplicate: number;
    'dirty-sync-count': number;
    'dirty-pages-rate'?: number;
    'page-size'?: number;
    mbps?: number;
  };
}

export interface RunState {
  running: boolean;
  status: string;
}

/** A migration status after which nothing more happens. */
export function isTerminal(status: string | undefined): boolean {
  return status === 'completed' || status === 'failed' || status === 'cancelled' || status === 'none' || status === undefined;
}

/** A migration is under way (setup, active, device, postcopy-*, cancelling, ...). */
export function isInProgress(status: string | undefined): boolean {
  return !isTerminal(status);
}

export class MigrationSetupError extends QemuSnapError {}

/**
 * Capabilities and parameters changed for one migration, with the values
 * they had: restore() puts every one back, in one command each, because
 * QEMU checks a capability set as a whole (background-snapshot and
 * return-path cannot be on together, so neither order of two commands works).
 */
export class MigrationSettings {
  private originalCaps: Record<string, boolean> = {};
  private originalParams: Record<string, unknown> = {};
  private changedCaps: string[] = [];
  private changedParams: string[] = [];

  constructor(private readonly qmp: QmpClient) {}

  /** Capability name → state, as QEMU has them now. */
  async capabilities(): Promise<Record<string, boolean>> {
    const list = await this.qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities');
    return Object.fromEntries(list.map((c) => [c.capability, c.state]));
  }

  async parameters(): Promise<Record<string, unknown>> {
    return this.qmp.execute<Record<string, unknown>>('query-migrate-parameters');
  }

  /**
   * Sets the capabilities (only those QEMU knows and that differ) and the
   * parameters; remembers the old values first.
   */
  async apply(caps: Record<string, boolean>, params: Record<string, number>): Promise<void> {
    const current = await this.capabilities();
    const currentParams = await this.parameters();
    const capChanges = Object.entries(caps).filter(([name, state]) => name in current && current[name] !== state);
    const paramChanges = Object.entries(params).filter(([name, value]) => currentParams[name] !== value);
    if (capChanges.length > 0) {
      for (const [name] of capChanges) this.originalCaps[name] = current[name];
      await this.qmp.execute('migrate-set-capabilities', { capabilities: capChanges.map(([capability, state]) => ({ capability, state })) });
      this.changedCaps = capChanges.map(([name]) => name);
    }
    if (paramChanges.length > 0) {
      for (const [name] of paramChanges) this.originalParams[name] = currentParams[name];
      await this.qmp.execute('migrate-set-parameters', Object.fromEntries(paramChanges));
      this.changedParams = paramChanges.map(([name]) => name);
    }
  }

  /** What apply() changed, for messages. */
  get changed(): string[] {
    return [...this.changedCaps, ...this.changedParams];
  }

  /** Puts back what apply() changed. Throws the first failure after trying both. */
  async restore(): Promise<void> {
    let first: Error | null = null;
    if (this.changedParams.length > 0) {
      try {
        await this.qmp.execute('migrate-set-parameters', Object.fromEntries(this.changedParams.map((n) => [n, this.originalParams[n]])));
        this.changedParams = [];
      } catch (err) {
        first ??= err as Error;
      }
    }
    if (this.changedCaps.length > 0) {
      try {
        await this.qmp.execute('migrate-set-capabilities', { capabilities: this.changedCaps.map((capability) => ({ capability, state: this.originalCaps[capability] })) });
        this.changedCaps = [];
      } catch (err) {
        first ??= err as Error;
      }
    }
    if (first) throw first;
  }
}

/**
 * Waits until query-migrate reports a status accepted by `until`, watching
 * MIGRATION events and polling (events can be missed: QEMU sends them only
 * with the `events` capability on). `onInfo` sees every answer.
 */
export async function waitMigration(
  qmp: QmpClient,
  until: (status: string | undefined) => boolean,
  opts: { timeoutMs?: number; pollMs?: number; onInfo?(info: MigrationInfo): void; abort?: AbortSignal } = {},
): Promise<MigrationInfo> {
  const deadline = Date.now() + (opts.timeoutMs ?? 24 * 3600_000);
  const pollMs = opts.pollMs ?? 250;
  for (;;) {
    const info = await qmp.execute<MigrationInfo>('query-migrate');
    opts.onInfo?.(info);
    if (until(info.status)) return info;
    if (opts.abort?.aborted) return info;
    if (Date.now() > deadline) throw new MigrationSetupError(`migration still ${info.status} after ${Math.round((opts.timeoutMs ?? 0) / 1000)} s`);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(finish, pollMs);
      const offEvent = qmp.onEvent((ev: QmpEvent) => {
        if (ev.event === 'MIGRATION') finish();
      });
      const offClose = qmp.onClose(() => finish());
      const onAbort = () => finish();
      opts.abort?.addEventListener('abort', onAbort);
      function finish() {
        clearTimeout(timer);
        offEvent();
        offClose();
        opts.abort?.removeEventListener('abort', onAbort);
        resolve();
      }
    });
  }
}

/** Socket buffers of the migration socketpair, as big as the pipes qemu-snap asks for (QEMU_SNAP_SOCKET_BUFFER=N overrides, 0 leaves the kernel's). */
const SOCKET_BUFFER = process.env.QEMU_SNAP_SOCKET_BUFFER !== undefined ? Number(process.env.QEMU_SNAP_SOCKET_BUFFER) || 0 : 1 << 20;

/** A connected socketpair: [ours, theirs]. Needs the native module. */
export function socketPair(): [number, number] {
  const n = native();
  if (!n?.socketPair) throw new MigrationSetupError('driving QEMU over QMP needs the native module (socketpair and fd passing): run npm run build:native');
  return n.socketPair(SOCKET_BUFFER);
}

let fdCounter = 0;

/**
 * Gives QEMU `fd` under a fresh name and closes our copy of it. Returns the
 * name for `fd:NAME` URIs.
 */
export async function passFd(qmp: QmpClient, fd: number): Promise<string> {
  const name = `qemu-snap-${process.pid}-${++fdCounter}`;
  try {
    await qmp.getfd(name, fd);
  } finally {
    fs.closeSync(fd);
  }
  return name;
}

/** Drops a named fd QEMU did not consume (a migrate command that failed). */
export async function closeFd(qmp: QmpClient, name: string): Promise<void> {
  await qmp.execute('closefd', { fdname: name }).catch((err: Error) => {
    if (!(err instanceof QmpCommandError)) throw err;
  });
}
