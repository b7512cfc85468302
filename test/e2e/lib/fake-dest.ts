// A stand-in migration destination for `migrate "exec:node fake-dest.js OUT [LOG]"`:
// stores the stream in OUT and plays the destination's side of the return
// path on stdout: PONG for each PING among the leading commands, and SHUT(0)
// once the stream ends with EOF + VMDESCRIPTION (QEMU's source waits for it
// before it completes). LOG gets one JSON line per event, for the tests.
import * as fs from 'node:fs';
import { findTrailer } from './stream-peek';

const TAIL_KEEP = 8 << 20;

function main(): void {
  const [outFile, logFile] = process.argv.slice(2);
  if (!outFile) {
    process.stderr.write('usage: fake-dest OUT [LOG]\n');
    process.exit(2);
  }
  // FAKE_DEST_MODE=no-pong: never answer PINGs; =close: end the return path instead of SHUT.
  const mode = process.env.FAKE_DEST_MODE ?? 'normal';
  const out = fs.openSync(outFile, 'w');
  const t0 = Date.now();
  const log = (ev: Record<string, unknown>) => {
    if (logFile) fs.appendFileSync(logFile, JSON.stringify({ ...ev, ms: Date.now() - t0 }) + '\n');
  };

  let total = 0;
  let head: Buffer | null = Buffer.alloc(0); // until the leading commands are parsed
  let tail: Buffer[] = [];
  let tailBytes = 0;
  let shutSent = false;

  const rp = (type: number, value: number) => {
    const m = Buffer.alloc(8);
    m.writeUInt16BE(type, 0);
    m.writeUInt16BE(4, 2);
    m.writeUInt32BE(value >>> 0, 4);
    process.stdout.write(m);
  };

  // Header (magic, version), CONFIGURATION, then a run of COMMANDs: answer the PINGs.
  const scanHead = (): boolean => {
    const b = head!;
    if (b.length < 13) return false;
    let p = 8;
    if (b[p] === 0x07) {
      const len = b.readUInt32BE(p + 1);
      p += 5 + len;
    }
    while (p < b.length) {
      if (b[p] !== 0x08) return true;
      if (p + 5 > b.length) return false;
      const cmd = b.readUInt16BE(p + 1);
      const len = b.readUInt16BE(p + 3);
      if (p + 5 + len > b.length) return false;
      log({ cmd, len, payload: b.subarray(p + 5, p + 5 + len).toString('hex'), offset: p });
      if (cmd === 2 && len === 4 && mode !== 'no-pong') {
        const v = b.readUInt32BE(p + 5);
        rp(2, v);
        log({ pong: v });
      }
      p += 5 + len;
    }
    return false;
  };

  process.stdin.on('data', (chunk: Buffer) => {
    fs.writeSync(out, chunk);
    total += chunk.length;
    if (head) {
      head = Buffer.concat([head, chunk]);
      if (scanHead() || head.length > 1 << 20) head = null;
    }
    tail.push(chunk);
    tailBytes += chunk.length;
    while (tail.length > 1 && tailBytes - tail[0].length >= TAIL_KEEP) tailBytes -= tail.shift()!.length;
    if (!shutSent && chunk[chunk.length - 1] === 0x7d) {
      const buf = Buffer.concat(tail);
      tail = [buf];
      const at = findTrailer(buf);
      if (at >= 0) {
        shutSent = true;
        if (mode === 'close') {
          fs.closeSync(1); // process.stdout.end() would not close a pipe's fd
          log({ closed: true, eofOffset: total - (buf.length - at), total });
        } else {
          rp(1, 0);
          log({ shut: 0, eofOffset: total - (buf.length - at), total });
        }
      }
    }
  });
  process.stdin.on('end', () => {
    fs.closeSync(out);
    log({ end: total });
    process.exit(0);
  });
}

main();
