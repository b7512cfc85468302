// The unix socket QEMU connects its migration channels to, for a multifd
// save: in a private directory (mode 0700: no other user can connect or
// replace it), removed with everything in it afterwards. Each connection is
// told apart by its first four bytes: the main channel starts with the
// stream's QEVM magic, a multifd channel with MultiFDInit_t's 0x11223344.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { QemuSnapError } from '../errors';
import { MULTIFD_MAGIC } from '../migration/multifd';

const QEVM_MAGIC = 0x5145564d;

export class MigrationChannelError extends QemuSnapError {}

export type ChannelKind = 'main' | 'multifd';

export interface ChannelListener {
  /** The socket's path, for `migrate unix:PATH`. */
  path: string;
  /**
   * Every connection once its kind is known, paused; the bytes read to tell
   * it are put back (unshift): its 'data' events start from its first byte.
   */
  onChannel(fn: (socket: net.Socket, kind: ChannelKind) => void): void;
  /** A connection that is neither kind, or a failure of the listener. */
  onError(fn: (err: Error) => void): void;
  /** Stops listening, destroys every connection and removes the directory. */
  close(): Promise<void>;
}

export async function listenPrivate(): Promise<ChannelListener> {
  // mkdtemp makes the directory 0700.
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'qemu-snap-mig-'));
  const sockPath = path.join(dir, 'migration.sock');
  const sockets = new Set<net.Socket>();
  let channelFn: ((socket: net.Socket, kind: ChannelKind) => void) | null = null;
  let errorFn: ((err: Error) => void) | null = null;
  let count = 0;
  const server = net.createServer((socket) => {
    const n = ++count;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    // Errors are read by whoever takes the socket; none may go unhandled.
    socket.on('error', () => undefined);
    const parts: Buffer[] = [];
    let have = 0;
    const onData = (chunk: Buffer) => {
      parts.push(chunk);
      have += chunk.length;
      if (have < 4) return;
      socket.off('data', onData);
      socket.pause();
      const prefix = Buffer.concat(parts, have);
      const magic = prefix.readUInt32BE(0);
      const kind: ChannelKind | null = magic === QEVM_MAGIC ? 'main' : magic === MULTIFD_MAGIC ? 'multifd' : null;
      if (kind === null) {
        socket.destroy();
        errorFn?.(new MigrationChannelError(`connection ${n} to the migration socket starts with 0x${magic.toString(16).padStart(8, '0')}: neither a migration stream (QEVM) nor a multifd channel`));
        return;
      }
      socket.unshift(prefix);
      channelFn?.(socket, kind);
    };
    socket.on('data', onData);
  });
  server.on('error', (err) => errorFn?.(err));
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(sockPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (err) {
    await fs.promises.rm(dir, { recursive: true, force: true });
    throw new MigrationChannelError(`cannot listen on ${sockPath}: ${(err as Error).message}`);
  }
  return {
    path: sockPath,
    onChannel: (fn) => (channelFn = fn),
    onError: (fn) => (errorFn = fn),
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await fs.promises.rm(dir, { recursive: true, force: true });
    },
  };
}
