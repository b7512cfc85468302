// A small QMP client: QEMU's JSON monitor protocol over a unix socket.
//
// One JSON object per line each way. QEMU greets with {"QMP": ...}, the
// client leaves capabilities-negotiation mode with qmp_capabilities, then
// sends {"execute", "arguments", "id"} and gets {"return"|"error", "id"} back;
// {"event"} messages arrive at any time. Every wait has a deadline: a QEMU
// that went away or hangs ends the wait with a typed error instead of a hang.
import * as net from 'node:net';
import { QemuSnapError } from '../errors';
import { native } from '../util/native';

/** Base of every QMP failure. */
export class QmpError extends QemuSnapError {}

/** QEMU answered a command with {"error": {"class", "desc"}}. */
export class QmpCommandError extends QmpError {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QEMU refused ${command}: ${desc}`);
  }
}

/** The connection could not be made, broke, or QEMU closed it. */
export class QmpConnectionError extends QmpError {
  constructor(
    readonly socketPath: string,
    detail: string,
  ) {
    super(`QMP ${socketPath}: ${detail}`);
  }
}

/** QEMU accepted the connection but never greeted: another client holds the socket. */
export class QmpBusyError extends QmpError {
  constructor(
    readonly socketPath: string,
    readonly waitedMs: number,
  ) {
    super(`QMP socket busy: another client is connected (${socketPath}: no greeting within ${(waitedMs / 1000).toFixed(1)} s; give qemu-snap a -qmp of its own)`);
  }
}

/** A command or an event did not come in time. */
export class QmpTimeoutError extends QmpError {
  constructor(
    readonly what: string,
    readonly timeoutMs: number,
  ) {
    super(`QMP: no ${what} within ${(timeoutMs / 1000).toFixed(1)} s`);
  }
}

/** An asynchronous event, e.g. MIGRATION, STOP, RESUME. */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpConnectOptions {
  /** How long QEMU may take to greet before the socket is deemed busy (default 3000 ms). */
  greetingTimeoutMs?: number;
  /** Default deadline of a command (default 30 s). */
  commandTimeoutMs?: number;
}

export interface ExecuteOptions {
  timeoutMs?: number;
  /** A file descriptor sent with the command as SCM_RIGHTS (for getfd / add-fd). */
  fd?: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type EventListener = (ev: QmpEvent) => void;

export class QmpClient {
  /** QEMU's version from the greeting, e.g. { major: 7, minor: 2, micro: 0 }. */
  version = { major: 0, minor: 0, micro: 0 };
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Set<EventListener>();
  private readonly commandTimeoutMs: number;
  private nextId = 1;
  private buffered = '';
  private failure: QmpError | null = null;
  private greeted: ((err: Error | null) => void) | null = null;
  private readonly closeListeners = new Set<(err: QmpError) => void>();

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
    opts: QmpConnectOptions,
  ) {
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 30_000;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => this.fail(new QmpConnectionError(socketPath, `connection lost (${(err as NodeJS.ErrnoException).code ?? err.message})`)));
    socket.on('close', () => this.fail(new QmpConnectionError(socketPath, 'QEMU closed the connection (it quit or crashed)')));
  }

  /** Connects, waits for the greeting and negotiates capabilities. */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        const why = err.code === 'ENOENT' ? 'no such socket' : err.code === 'ECONNREFUSED' ? 'nothing listens there (is QEMU running with -qmp unix:...,server=on?)' : err.message;
        reject(new QmpConnectionError(socketPath, `cannot connect: ${why}`));
      });
    });
    const client = new QmpClient(socket, socketPath, opts);
    const waitMs = opts.greetingTimeoutMs ?? 3000;
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new QmpBusyError(socketPath, waitMs)), waitMs);
        client.greeted = (err) => {
          clearTimeout(timer);
          client.greeted = null;
          if (err) reject(err);
          else resolve();
        };
      });
      await client.execute('qmp_capabilities');
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** Runs one command; resolves with its "return" value. */
  execute<T = unknown>(command: string, args?: object, opts: ExecuteOptions = {}): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    const line = JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) + '\n';
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpTimeoutError(`answer to ${command}`, timeoutMs));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      try {
        if (opts.fd === undefined) this.socket.write(line);
        else this.sendWithFd(Buffer.from(line), opts.fd);
      } catch (err) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(err instanceof QmpError ? err : new QmpConnectionError(this.socketPath, `sending ${command}: ${(err as Error).message}`));
      }
    });
  }

  /**
   * Hands QEMU a file descriptor under `name` (QMP getfd, SCM_RIGHTS): QEMU
   * holds its own copy afterwards, so the caller may close `fd`.
   */
  async getfd(name: string, fd: number): Promise<void> {
    // The descriptor goes with a sendmsg of our own: whatever Node still
    // queues on the socket must be out first.
    while (this.socket.writableLength > 0 && !this.failure) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.socket.off('drain', done);
          resolve();
        };
        const timer = setTimeout(done, 100);
        this.socket.once('drain', done);
      });
    }
    await this.execute('getfd', { fdname: name }, { fd });
  }

  /** Calls `fn` for every event until the returned function is called. */
  onEvent(fn: EventListener): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Calls `fn` once when the connection is gone (QEMU quit, or close()). */
  onClose(fn: (err: QmpError) => void): () => void {
    if (this.failure) {
      fn(this.failure);
      return () => undefined;
    }
    this.closeListeners.add(fn);
    return () => this.closeListeners.delete(fn);
  }

  /** The next event `name` (matching `accept` when given), or a timeout or connection error. */
  waitEvent(name: string, timeoutMs: number, accept?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<QmpEvent>((resolve, reject) => {
      const done = (err: Error | null, ev?: QmpEvent) => {
        clearTimeout(timer);
        offEvent();
        offClose();
        if (err) reject(err);
        else resolve(ev as QmpEvent);
      };
      const timer = setTimeout(() => done(new QmpTimeoutError(`${name} event`, timeoutMs)), timeoutMs);
      const offEvent = this.onEvent((ev) => {
        if (ev.event === name && (!accept || accept(ev))) done(null, ev);
      });
      const offClose = this.onClose((err) => done(err));
    });
  }

  get closed(): boolean {
    return this.failure !== null;
  }

  close(): void {
    this.fail(new QmpConnectionError(this.socketPath, 'closed'));
    this.socket.destroy();
  }

  private sendWithFd(line: Buffer, fd: number): void {
    const n = native();
    if (!n?.sendFd) throw new QmpError('passing a file descriptor to QEMU needs the native module (npm run build:native)');
    // Whatever Node still queues must go first: the two paths share the socket.
    if (this.socket.writableLength > 0) throw new QmpError('QMP socket busy writing; cannot pass a file descriptor now');
    const handle = (this.socket as unknown as { _handle?: { fd?: number } })._handle;
    if (typeof handle?.fd !== 'number' || handle.fd < 0) throw new QmpConnectionError(this.socketPath, 'no file descriptor behind the socket');
    n.sendFd(handle.fd, fd, line);
  }

  private onData(chunk: string): void {
    this.buffered += chunk;
    let nl: number;
    while ((nl = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, nl).trim();
      this.buffered = this.buffered.slice(nl + 1);
      if (line) this.onMessage(line);
    }
    if (this.buffered.length > 16 << 20) this.protocolError('a message longer than 16 MiB');
  }

  private protocolError(what: string): void {
    this.fail(new QmpConnectionError(this.socketPath, `not QMP: ${what}`));
    this.socket.destroy();
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return this.protocolError(`unparsable line ${JSON.stringify(line.slice(0, 80))}`);
    }
    if (msg === null || typeof msg !== 'object') return this.protocolError(`unexpected ${JSON.stringify(line.slice(0, 80))}`);
    if ('QMP' in msg) {
      const v = (msg.QMP as { version?: { qemu?: { major?: number; minor?: number; micro?: number } } })?.version?.qemu;
      if (v) this.version = { major: v.major ?? 0, minor: v.minor ?? 0, micro: v.micro ?? 0 };
      this.greeted?.(null);
      return;
    }
    if (typeof msg.event === 'string') {
      const ev: QmpEvent = { event: msg.event, data: (msg.data as Record<string, unknown>) ?? {}, timestamp: msg.timestamp as QmpEvent['timestamp'] };
      for (const fn of [...this.listeners]) fn(ev);
      return;
    }
    const id = msg.id;
    const p = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (!p || typeof id !== 'number') return; // a reply to a command that timed out
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const e = (msg.error ?? {}) as { class?: string; desc?: string };
      p.reject(new QmpCommandError(p.command, e.class ?? 'GenericError', e.desc ?? '(no description)'));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(err: QmpError): void {
    if (this.failure) return;
    this.failure = err;
    this.greeted?.(err);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new QmpConnectionError(this.socketPath, `${p.command}: ${err.message.replace(/^QMP \S+: /, '')}`));
    }
    this.pending.clear();
    for (const fn of [...this.closeListeners]) fn(err);
    this.closeListeners.clear();
  }
}
