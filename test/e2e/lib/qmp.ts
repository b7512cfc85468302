import * as net from 'node:net';
import { QemuSnapError } from '../../../src/errors';

/** An asynchronous event QEMU sent on the QMP socket. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
  /** Date.now() when we received it. */
  receivedAt: number;
}

/** QEMU answered a command with `{"error": ...}`. */
export class QmpCommandError extends QemuSnapError {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
  }
}

/** The QMP connection broke or never came up. */
export class QmpConnectionError extends QemuSnapError {
  constructor(readonly socketPath: string, detail: string) {
    super(`QMP ${socketPath}: ${detail}`);
  }
}

/** A wait (event, connection) ran past its deadline. */
export class QmpTimeoutError extends QemuSnapError {
  constructor(readonly what: string, readonly timeoutMs: number) {
    super(`timed out after ${timeoutMs} ms waiting for ${what}`);
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

interface EventWaiter {
  name: string;
  resolve: (ev: QmpEvent) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export interface QmpConnectOptions {
  /** Keep retrying the connection this long while QEMU starts (ms). */
  timeoutMs?: number;
  /** Called between retries; throw from it to abort (e.g. QEMU exited). */
  onRetry?: () => void;
}

/**
 * Minimal QMP client: one JSON object per line, commands matched to replies
 * by id (QEMU answers in order anyway, the id only guards against mixing up
 * a late reply after a timeout).
 */
export class Qmp {
  /** Every event received so far, in order. */
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<number, Pending>();
  private readonly waiters: EventWaiter[] = [];
  // Events already handed out by waitEvent, so two waits for the same name
  // see two different occurrences.
  private readonly consumed = new Set<QmpEvent>();
  private nextId = 1;
  private buffered = '';
  private closedError: Error | null = null;
  private greeting: ((err: Error | null) => void) | null = null;

  private constructor(private readonly socket: net.Socket, readonly socketPath: string) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => this.fail(new QmpConnectionError(socketPath, err.message)));
    socket.on('close', () => this.fail(new QmpConnectionError(socketPath, 'connection closed')));
  }

  /** Connect to QEMU's QMP socket, retrying while it does not exist yet, and leave capabilities negotiation mode. */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<Qmp> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
    let lastError = 'not tried';
    for (;;) {
      opts.onRetry?.();
      try {
        const socket = await connectOnce(socketPath);
        const qmp = new Qmp(socket, socketPath);
        await qmp.awaitGreeting(Math.max(1000, deadline - Date.now()));
        await qmp.execute('qmp_capabilities');
        return qmp;
      } catch (err) {
        lastError = (err as Error).message;
        if (err instanceof QmpCommandError) throw err;
      }
      if (Date.now() > deadline) throw new QmpConnectionError(socketPath, `could not connect: ${lastError}`);
      await sleep(20);
    }
  }

  /** Run one QMP command; resolves with its `return` value, rejects with QmpCommandError carrying QEMU's class and desc. */
  execute<T = unknown>(command: string, args?: object): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  /**
   * Resolve with the first event called `name` that no earlier waitEvent
   * returned, including one that already arrived.
   */
  waitEvent(name: string, timeoutMs = 10_000): Promise<QmpEvent> {
    const seen = this.events.find((e) => e.event === name && !this.consumed.has(e));
    if (seen) {
      this.consumed.add(seen);
      return Promise.resolve(seen);
    }
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters.splice(this.waiters.indexOf(waiter), 1);
          reject(new QmpTimeoutError(`QMP event ${name}`, timeoutMs));
        }, timeoutMs),
      };
      this.waiters.push(waiter);
    });
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  close(): void {
    this.fail(new QmpConnectionError(this.socketPath, 'closed by client'));
    this.socket.destroy();
  }

  private awaitGreeting(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.greeting = null;
        this.socket.destroy();
        reject(new QmpTimeoutError('QMP greeting', timeoutMs));
      }, timeoutMs);
      this.greeting = (err) => {
        clearTimeout(timer);
        this.greeting = null;
        if (err) reject(err);
        else resolve();
      };
    });
  }

  private onData(chunk: string): void {
    this.buffered += chunk;
    let nl: number;
    while ((nl = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, nl).trim();
      this.buffered = this.buffered.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(new QmpConnectionError(this.socketPath, `unparsable message: ${line.slice(0, 200)}`));
      this.socket.destroy();
      return;
    }
    if ('QMP' in msg) {
      this.greeting?.(null);
      return;
    }
    if (typeof msg.event === 'string') {
      const ev: QmpEvent = {
        event: msg.event,
        data: msg.data as Record<string, unknown> | undefined,
        timestamp: msg.timestamp as QmpEvent['timestamp'],
        receivedAt: Date.now(),
      };
      this.events.push(ev);
      const i = this.waiters.findIndex((w) => w.name === ev.event);
      if (i >= 0) {
        const [w] = this.waiters.splice(i, 1);
        clearTimeout(w.timer);
        this.consumed.add(ev);
        w.resolve(ev);
      }
      return;
    }
    const id = msg.id as number | undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) return;
    this.pending.delete(id);
    if ('error' in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpCommandError(p.command, e.class ?? 'GenericError', e.desc ?? '(no description)'));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    this.greeting?.(err);
    for (const p of this.pending.values()) p.reject(new QmpConnectionError(this.socketPath, `${p.command}: ${err.message}`));
    this.pending.clear();
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
  }
}

function connectOnce(path: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(path);
    s.once('connect', () => {
      s.removeListener('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
