// Builds small synthetic QEMU migration streams (version 3) for tests, byte
// by byte, independently of the encoder under test.
import { spawn, spawnSync } from 'child_process';
import * as net from 'net';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Readable, Writable } from 'streamx';
import { MigrationFramer, MigrationFramerOptions } from '../../src/migration/framer';
import type { MigrationRecord } from '../../src/migration/records';

function be16(n: number): Buffer { const b = Buffer.alloc(2); b.writeUInt16BE(n); return b; }
function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0); return b; }
function be64(n: number): Buffer { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; }
function counted(s: string): Buffer { const id = Buffer.from(s, 'latin1'); return Buffer.concat([Buffer.from([id.length]), id]); }

export interface SyntheticBlock { id: string; length: number; extras?: number[] }

export class StreamBuilder {
  private parts: Buffer[] = [];
  constructor(readonly pageSize = 4096) {}

  raw(b: Buffer | number[]): this { this.parts.push(Buffer.isBuffer(b) ? b : Buffer.from(b)); return this; }
  header(version = 3, magic = 0x5145564d): this { return this.raw(Buffer.concat([be32(magic), be32(version)])); }
  configuration(machine = 'pc-i440fx-7.2', opts: { pageBits?: number; capabilities?: string[]; uuid?: Buffer } = {}): this {
    const parts = [Buffer.from([0x07]), be32(machine.length), Buffer.from(machine, 'latin1')];
    if (opts.pageBits !== undefined) parts.push(Buffer.from([0x05]), counted('configuration/target-page-bits'), be32(1), be32(opts.pageBits));
    if (opts.capabilities) {
      parts.push(Buffer.from([0x05]), counted('configuration/capabilities'), be32(1), be32(opts.capabilities.length));
      for (const c of opts.capabilities) parts.push(counted(c));
    }
    if (opts.uuid) parts.push(Buffer.from([0x05]), counted('configuration/uuid'), be32(1), opts.uuid);
    return this.raw(Buffer.concat(parts));
  }
  command(cmd: number, payload: Buffer = Buffer.alloc(0)): this {
    return this.raw(Buffer.concat([Buffer.from([0x08]), be16(cmd), be16(payload.length), payload]));
  }
  openReturnPath(): this { return this.command(1); }
  ping(n: number): this { return this.command(2, be32(n)); }
  /** POSTCOPY_ADVISE as a postcopy-ram source sends it: be64 page size summary, be64 target page size. */
  postcopyAdvise(summary = 4096, target = 4096): this { return this.command(3, Buffer.concat([be64(summary), be64(target)])); }
  sectionStart(id: number, idstr = 'ram', instance = 0, version = 4, token = 0x01): this {
    return this.raw(Buffer.concat([Buffer.from([token]), be32(id), counted(idstr), be32(instance), be32(version)]));
  }
  sectionPart(id: number): this { return this.raw(Buffer.concat([Buffer.from([0x02]), be32(id)])); }
  sectionEnd(id: number): this { return this.raw(Buffer.concat([Buffer.from([0x03]), be32(id)])); }
  footer(id: number): this { return this.raw(Buffer.concat([Buffer.from([0x7e]), be32(id)])); }
  ramHeader(address: number, flags: number): this { return this.raw(be64(address + flags)); }
  memSize(blocks: SyntheticBlock[], total?: number): this {
    const sum = total ?? blocks.reduce((a, b) => a + b.length, 0);
    const parts = [be64(sum + 0x04)];
    for (const b of blocks) {
      parts.push(counted(b.id), be64(b.length));
      for (const e of b.extras ?? []) parts.push(be64(e));
    }
    return this.raw(Buffer.concat(parts));
  }
  page(address: number, block: string | null, data?: Buffer): this {
    const d = data ?? Buffer.alloc(this.pageSize, address / this.pageSize);
    const flags = 0x08 | (block === null ? 0x20 : 0);
    return this.raw(Buffer.concat([be64(address + flags), block === null ? Buffer.alloc(0) : counted(block), d]));
  }
  zero(address: number, block: string | null, fill = 0): this {
    const flags = 0x02 | (block === null ? 0x20 : 0);
    return this.raw(Buffer.concat([be64(address + flags), block === null ? Buffer.alloc(0) : counted(block), Buffer.from([fill])]));
  }
  eos(): this { return this.raw(be64(0x10)); }
  multifdFlush(): this { return this.raw(be64(0x200)); }
  /** A device SECTION_FULL with an opaque body and its footer. */
  device(id: number, idstr: string, body: Buffer): this {
    return this.sectionStart(id, idstr, 0, 1, 0x04).raw(body).footer(id);
  }
  eof(): this { return this.raw([0x00]); }
  vmdesc(json: unknown): this {
    const j = Buffer.from(JSON.stringify(json));
    return this.raw(Buffer.concat([Buffer.from([0x06]), be32(j.length), j]));
  }
  build(): Buffer { return Buffer.concat(this.parts); }
  get length(): number { return this.parts.reduce((a, b) => a + b.length, 0); }
}

export const BLOCKS: SyntheticBlock[] = [
  { id: 'pc.ram', length: 16 * 4096 },
  { id: '/rom@etc/acpi/tables', length: 2 * 4096 },
];

/** Start of a valid stream, up to and including the ram START section. */
export function leader(b = new StreamBuilder(), blocks = BLOCKS): StreamBuilder {
  return b.header().configuration().sectionStart(2).memSize(blocks).eos().footer(2);
}

/** A complete valid stream: leader, a PART with pages, an END, device state, EOF, optional VM description. */
export function completeStream(opts: { vmdesc?: boolean; postcopy?: boolean } = {}): Buffer {
  const b = new StreamBuilder().header().configuration();
  if (opts.postcopy) b.openReturnPath().ping(1).postcopyAdvise();
  b.sectionStart(2).memSize(BLOCKS).eos().footer(2);
  b.sectionPart(2).page(0, 'pc.ram').page(4096, null).zero(8192, null).page(0, '/rom@etc/acpi/tables').multifdFlush().zero(4096, null).eos().footer(2);
  b.sectionPart(2).page(12288, 'pc.ram').eos().footer(2);
  b.sectionEnd(2).page(4096, null).eos().footer(2);
  // Device bodies deliberately contain tail look-alikes (0x7e ... 0x00 0x06).
  b.device(3, 'timer', Buffer.from([1, 2, 0x7e, 0, 0, 0, 3, 0, 0x06, 0, 0, 0, 2, 0x7b, 0x7d, 9]));
  b.device(4, 'cpu', Buffer.alloc(300, 0x7e));
  b.eof();
  if (opts.vmdesc !== false) b.vmdesc({ page_size: 4096, devices: [{ name: 'timer' }, { name: 'cpu' }] });
  return b.build();
}

/** Feeds `input` to a framer in the given chunk sizes; resolves with its records or rejects with its error. */
export function frame(input: Buffer, chunkSizes: number[] | ((i: number) => number) = [input.length], opts: MigrationFramerOptions = {}): Promise<MigrationRecord[]> {
  const chunks: Buffer[] = [];
  let pos = 0;
  for (let i = 0; pos < input.length; i++) {
    const n = Math.max(1, typeof chunkSizes === 'function' ? chunkSizes(i) : chunkSizes[i % chunkSizes.length]);
    chunks.push(input.subarray(pos, pos + n));
    pos += n;
  }
  return new Promise((resolve, reject) => {
    const records: MigrationRecord[] = [];
    const framer = new MigrationFramer(opts);
    const sink = new Writable({
      write(r: unknown, cb: (err: Error | null) => void) { records.push(r as MigrationRecord); cb(null); },
    });
    let failed = false;
    const onError = (err: Error) => { if (!failed) { failed = true; reject(err); } };
    framer.on('error', onError);
    sink.on('error', onError);
    sink.on('finish', () => { if (!failed) resolve(records); });
    Readable.from(chunks).pipe(framer).pipe(sink);
  });
}

export { prng } from '../helpers';

// ---- real QEMU streams (for identity tests and the benchmark) ----


export function haveQemu(): boolean {
  return spawnSync('qemu-system-x86_64', ['--version']).status === 0;
}

/** A minimal QMP client: one command at a time, events skipped. */
class Qmp {
  private buf = '';
  private waiters: Array<(msg: Record<string, unknown>) => void> = [];
  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) continue;
        const w = this.waiters.shift();
        if (w) w(msg);
      }
    });
  }

  static async connect(sockPath: string, timeoutMs = 10000): Promise<Qmp> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(sockPath, () => resolve(s));
          s.once('error', reject);
        });
        const qmp = new Qmp(sock);
        await qmp.next(); // greeting
        await qmp.cmd('qmp_capabilities');
        return qmp;
      } catch (err) {
        if (Date.now() > until) throw err;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  private next(): Promise<Record<string, unknown>> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async cmd(execute: string, args?: Record<string, unknown>): Promise<Record<string, unknown>> {
    const reply = this.next();
    this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    const msg = await reply;
    if ('error' in msg) throw new Error(`QMP ${execute}: ${JSON.stringify(msg.error)}`);
    return (msg.return ?? {}) as Record<string, unknown>;
  }

  close(): void { this.sock.destroy(); }
}

export interface CaptureOptions {
  memMiB: number;
  /** File loaded raw into guest RAM at `patternAddr` (default 16 MiB). */
  patternFile?: string;
  patternAddr?: number;
  /** Migration capabilities to enable on the source (e.g. 'x-ignore-shared'). */
  capabilities?: string[];
}

export interface CaptureResult {
  /** Data pages and zero pages sent, from the source's query-migrate. */
  normal: number;
  duplicate: number;
  seconds: number;
}

/** Runs a paused KVM VM and migrates it into `outFile` through `exec:cat`. */
export async function captureQemuStream(outFile: string, opts: CaptureOptions): Promise<CaptureResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsnap-qmp-'));
  const sockPath = path.join(dir, 'qmp.sock');
  const args = ['-machine', 'pc,accel=kvm:tcg', '-m', String(opts.memMiB), '-display', 'none', '-S',
    '-qmp', `unix:${sockPath},server=on,wait=off`];
  if (opts.patternFile) {
    args.push('-device', `loader,file=${opts.patternFile},addr=0x${(opts.patternAddr ?? 0x1000000).toString(16)},force-raw=on`);
  }
  const vm = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  vm.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const exited = new Promise<void>((resolve) => vm.once('exit', () => resolve()));
  let qmp: Qmp | null = null;
  try {
    qmp = await Qmp.connect(sockPath);
    await qmp.cmd('migrate-set-parameters', { 'max-bandwidth': 100000000000 });
    if (opts.capabilities?.length) {
      await qmp.cmd('migrate-set-capabilities', { capabilities: opts.capabilities.map((c) => ({ capability: c, state: true })) });
    }
    const t0 = process.hrtime.bigint();
    await qmp.cmd('migrate', { uri: `exec:cat > ${outFile}` });
    for (;;) {
      const info = await qmp.cmd('query-migrate');
      if (info.status === 'completed') {
        const ram = info.ram as { normal: number; duplicate: number };
        return { normal: ram.normal, duplicate: ram.duplicate, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
      }
      if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${String(info.status)}: ${JSON.stringify(info)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } catch (err) {
    throw new Error(`${(err as Error).message}\n${stderr}`);
  } finally {
    if (qmp) { try { await qmp.cmd('quit'); } catch { /* it may be gone */ } qmp.close(); }
    const timer = setTimeout(() => vm.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
