import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as crypto from 'crypto';
import { Readable, Writable } from 'streamx';
import {
  MigrationEncoder,
  encodeRecord,
  writeRamRecordHeader,
  writeRamEos,
  writeSectionPart,
  writeSectionFooter,
  writeSectionStart,
  writeCommand,
  ramRecordHeaderLength,
  RAM_RECORD_HEADER_MAX,
} from '../../src/migration/encoder';
import { RamFlag, Token } from '../../src/migration/constants';
import type { MigrationRecord } from '../../src/migration/records';
import { StreamBuilder, captureQemuStream, completeStream, frame, haveQemu, leader } from './synthetic-stream';

function encodeAll(records: MigrationRecord[], opts?: { bufferSize?: number }): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    const enc = new MigrationEncoder(opts);
    const sink = new Writable({ write(b: unknown, cb: (e: Error | null) => void) { out.push(b as Buffer); cb(null); } });
    enc.on('error', reject);
    sink.on('finish', () => resolve(out));
    Readable.from(records).pipe(enc).pipe(sink);
  });
}

test('encodeRecord: parse then encode gives back the identical bytes (synthetic)', async () => {
  const inputs = [
    completeStream(),
    completeStream({ vmdesc: false, postcopy: true }),
    new StreamBuilder(16384).header().configuration('virt', { pageBits: 14, capabilities: ['x-ignore-shared'], uuid: Buffer.alloc(16, 7) })
      .sectionStart(0).memSize([{ id: 'a', length: 65536, extras: [0x8000000] }, { id: 'b', length: 16384, extras: [0] }]).multifdFlush().eos().footer(0)
      .sectionEnd(0).page(16384, 'a').zero(0, 'b', 0).eos().footer(0).device(1, 'cpu', Buffer.alloc(5, 0x7e)).eof().build(),
  ];
  for (const input of inputs) {
    const records = await frame(input, [13]);
    assert.equal(Buffer.concat(records.flatMap(encodeRecord)), input);
    assert.equal(Buffer.concat(await encodeAll(records)), input);
  }
});

test('MigrationEncoder coalesces many small records into large buffers', async () => {
  const b = leader().sectionPart(2);
  for (let i = 0; i < 16; i++) b.page(i * 4096, i === 0 ? 'pc.ram' : null);
  for (let i = 0; i < 16; i++) b.zero(i * 4096, null);
  const input = b.eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'd', Buffer.alloc(100000, 1)).eof().build();
  const records = await frame(input, [4096 + 9]);
  const out = await encodeAll(records, { bufferSize: 64 * 1024 });
  assert.equal(Buffer.concat(out), input);
  // 100 records -> a handful of buffers (large device chunk passed through as is).
  assert.ok(out.length <= 6, `got ${out.length} output buffers`);
  assert.ok(out.some((o) => o.length >= 64 * 1024 - 5000));
});

test('write helpers produce what the framer parses back', async () => {
  const buf = Buffer.alloc(1 << 16);
  const id = Buffer.from('pc.ram');
  const ref = leader().build();
  ref.copy(buf, 0);
  let p = ref.length;
  p = writeSectionPart(buf, p, Token.SECTION_PART, 2);
  assert.is(ramRecordHeaderLength(id), 9 + id.length);
  assert.is(ramRecordHeaderLength(null), 8);
  assert.ok(RAM_RECORD_HEADER_MAX >= 264);
  p = writeRamRecordHeader(buf, p, 4096, RamFlag.PAGE, id);
  p += buf.fill(0xab, p, p + 4096) && 4096;
  p = writeRamRecordHeader(buf, p, 8192, RamFlag.ZERO, null);
  buf[p++] = 0;
  p = writeRamEos(buf, p);
  p = writeSectionFooter(buf, p, 2);
  p = writeCommand(buf, p, 2, Buffer.from([0, 0, 0, 5]));
  p = writeSectionPart(buf, p, Token.SECTION_END, 2);
  p = writeRamEos(buf, p);
  p = writeSectionFooter(buf, p, 2);
  p = writeSectionStart(buf, p, Token.SECTION_FULL, 3, Buffer.from('timer'), 0, 2);
  buf[p++] = 1;
  p = writeSectionFooter(buf, p, 3);
  buf[p++] = Token.EOF;
  const records = await frame(buf.subarray(0, p));
  const got = records.map((r) => r.type === 'ram-page' || r.type === 'ram-zero' ? `${r.type}:${r.block.id}:${r.address}:${r.continued}` : r.type);
  // Device state may arrive in several chunks: compare it as one.
  const merged = got.filter((t, i) => !(t === 'device-state' && got[i - 1] === 'device-state'));
  assert.equal(merged.slice(6), ['section-part', 'ram-page:pc.ram:4096:false', 'ram-zero:pc.ram:8192:true', 'ram-eos', 'section-footer', 'command',
    'section-end', 'ram-eos', 'section-footer', 'device-state', 'eof']);
});

test('real QEMU stream: counters match query-migrate, parse -> encode is byte-identical', async () => {
  if (!haveQemu()) { console.log('qemu-system-x86_64 missing: skipped'); return; }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsnap-enc-'));
  try {
    const pattern = path.join(dir, 'pattern.bin');
    fs.writeFileSync(pattern, crypto.randomBytes(1024 * 1024));
    for (const capabilities of [[], ['x-ignore-shared']]) {
      const streamFile = path.join(dir, 'vm.stream');
      const stats = await captureQemuStream(streamFile, { memMiB: 64, patternFile: pattern, capabilities });
      const input = fs.readFileSync(streamFile);
      const records = await frame(input, [65536]);
      const pages = records.filter((r) => r.type === 'ram-page').length;
      const zeros = records.filter((r) => r.type === 'ram-zero').length;
      assert.is(pages, stats.normal, 'data pages vs query-migrate normal');
      assert.is(zeros, stats.duplicate, 'zero pages vs query-migrate duplicate');
      // The random pattern is in pc.ram at 16 MiB, page for page.
      const pat = fs.readFileSync(pattern);
      for (const r of records) {
        if (r.type === 'ram-page' && r.block.id === 'pc.ram' && r.address >= 0x1000000 && r.address < 0x1100000) {
          assert.equal(r.data, pat.subarray(r.address - 0x1000000, r.address - 0x1000000 + 4096));
        }
      }
      const mem = records.find((r) => r.type === 'ram-mem-size');
      if (mem?.type !== 'ram-mem-size') return assert.unreachable('no MEM_SIZE');
      assert.ok(mem.blocks.some((b) => b.id === 'pc.ram' && b.length === 64 * 1024 * 1024));
      if (capabilities.length) assert.ok(mem.blocks.every((b) => b.mrAddr !== undefined), 'x-ignore-shared sends each block GPA');
      else assert.ok(mem.blocks.every((b) => b.mrAddr === undefined && b.pageSize === undefined));
      assert.ok(records.some((r) => r.type === 'vmdescription'));
      assert.equal(Buffer.concat(await encodeAll(records)), input);
      // Also with odd chunking.
      const again = await frame(input, [4099, 1, 77777]);
      assert.equal(Buffer.concat(again.flatMap(encodeRecord)), input);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
