// A load → socket: connects to a QEMU started with `-incoming unix:SOCKET`
// (or tcp:HOST:PORT) and sends it the image's precopy stream.
// Usage: node dist/examples/load-to-socket.js IMAGE SOCKET|HOST:PORT
//
// In your own code, import from 'qemu-snap' instead of '../src'.
import * as net from 'node:net';
import { pipeline } from 'node:stream/promises';
import { createLoadStream } from '../src';

async function main(): Promise<void> {
  const [imagePath, where] = process.argv.slice(2);
  if (!imagePath || !where) throw new Error('usage: load-to-socket IMAGE SOCKET|HOST:PORT');
  const hostPort = /^(.*):(\d+)$/.exec(where);
  const socket = hostPort ? net.connect(Number(hostPort[2]), hostPort[1]) : net.connect(where);
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  let pages = 0;
  await pipeline(createLoadStream(imagePath, { onDone: (r) => (pages = r.dataPagesSent) }), socket);
  console.error(`load-to-socket: sent ${imagePath} (${pages} data pages) to ${where}`);
}

main().catch((err: Error) => {
  console.error(`load-to-socket: ${err.message}`);
  process.exit(1);
});
