// A socket → zstd → save: listens on a unix socket (or TCP port), takes one
// connection carrying a zstd-compressed migration stream (e.g. from
// `migrate "exec:zstd | nc -U SOCKET"` on a remote host), decompresses it
// with the zstd command and saves the image.
// Usage: node dist/examples/zstd-socket-save.js SOCKET|PORT IMAGE
//
// In your own code, import from 'qemu-snap' instead of '../src'.
import * as net from 'node:net';
import { spawn } from 'node:child_process';
import { saveSnapshot } from '../src';

async function main(): Promise<void> {
  const [where, imagePath] = process.argv.slice(2);
  if (!where || !imagePath) throw new Error('usage: zstd-socket-save SOCKET|PORT IMAGE');
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    if (/^\d+$/.test(where)) server.listen(Number(where), '127.0.0.1', resolve);
    else server.listen(where, resolve);
  });
  console.error(`zstd-socket-save: listening on ${where}`);
  const socket = await new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  server.close();
  const zstd = spawn('zstd', ['-d', '-c', '-q'], { stdio: ['pipe', 'pipe', 'inherit'] });
  const exited = new Promise<number | null>((resolve) => zstd.on('close', resolve));
  zstd.on('error', (err) => socket.destroy(err));
  socket.pipe(zstd.stdin);
  const r = await saveSnapshot(zstd.stdout, imagePath);
  const code = await exited;
  if (code !== 0) throw new Error(`zstd -d exited with ${code}`);
  console.error(`zstd-socket-save: saved ${r.imagePath}: ${r.dataPages} data pages from ${r.streamBytes} bytes of stream`);
}

main().catch((err: Error) => {
  console.error(`zstd-socket-save: ${err.message}`);
  process.exit(1);
});
