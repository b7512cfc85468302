import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MigrationFramer } from '../../src/migration/framer';
import { StreamFormatError } from '../../src/migration/errors';
import { QemuSnapError } from '../../src/errors';
import { expandPageRun, FramedRecord, MigrationRecord } from '../../src/migration/records';
import { BLOCKS, StreamBuilder, completeStream, frame, leader, prng } from './synthetic-stream';

/** Records as plain JSON-able values (buffers as hex), for deep comparison across chunkings. */
function normalize(records: MigrationRecord[]): unknown[] {
  // Consecutive device-state chunks depend on chunking by design: merge them.
  const out: unknown[] = [];
  let dev: { offset: number; hex: string } | null = null;
  for (const r of records) {
    if (r.type === 'device-state') {
      if (dev && dev.offset + dev.hex.length / 2 === r.offset) dev.hex += r.data.toString('hex');
      else { dev = { offset: r.offset, hex: r.data.toString('hex') }; out.push(dev); }
      continue;
    }
    dev = null;
    out.push(JSON.parse(JSON.stringify(r, (_k, v) => (v && v.type === 'Buffer' && Array.isArray(v.data) ? Buffer.from(v.data).toString('hex') : v))));
  }
  return out;
}

async function expectError(input: Buffer, pattern: RegExp, offset?: number, chunks: number[] = [input.length]): Promise<StreamFormatError> {
  try {
    await frame(input, chunks);
  } catch (err) {
    assert.instance(err, StreamFormatError);
    assert.instance(err, QemuSnapError);
    const e = err as StreamFormatError;
    assert.match(e.message, pattern);
    assert.match(e.message, /^bad stream at byte \d+: /);
    if (offset !== undefined) assert.is(e.offset, offset, `offset of: ${e.message}`);
    return e;
  }
  assert.unreachable(`expected an error matching ${pattern}`);
  throw new Error('unreachable');
}

test('complete stream: record sequence, offsets, CONTINUE resolution', async () => {
  const input = completeStream();
  const records = await frame(input);
  const types = records.map((r) => r.type);
  assert.equal(types.slice(0, 6), ['header', 'configuration', 'section-start', 'ram-mem-size', 'ram-eos', 'section-footer']);
  const mem = records[3];
  assert.is(mem.type, 'ram-mem-size');
  if (mem.type !== 'ram-mem-size') return;
  assert.is(mem.totalBytes, 18 * 4096);
  assert.equal(mem.blocks.map((b) => [b.id, b.length, b.index]), [['pc.ram', 65536, 0], ['/rom@etc/acpi/tables', 8192, 1]]);
  const pages = records.filter((r) => r.type === 'ram-page' || r.type === 'ram-zero');
  const summary = pages.map((r) => (r.type === 'ram-page' || r.type === 'ram-zero') ? [r.type, r.block.id, r.address, r.continued] : []);
  assert.equal(summary, [
    ['ram-page', 'pc.ram', 0, false],
    ['ram-page', 'pc.ram', 4096, true],
    ['ram-zero', 'pc.ram', 8192, true],
    ['ram-page', '/rom@etc/acpi/tables', 0, false],
    ['ram-zero', '/rom@etc/acpi/tables', 4096, true],
    ['ram-page', 'pc.ram', 12288, false],
    // CONTINUE across sections resolves to the last block of the previous section.
    ['ram-page', 'pc.ram', 4096, true],
  ]);
  assert.ok(types.includes('ram-multifd-flush'));
  // Every record's offset points at its first byte.
  for (const r of records) {
    if (r.type === 'ram-page') {
      assert.is(input.readUInt32BE(r.offset + 4) & 0xfff & ~0x20, 0x08);
      assert.ok(input.subarray(r.offset).indexOf(r.data) > 0);
      assert.equal(r.data, Buffer.alloc(4096, r.address / 4096));
    }
    if (r.type === 'section-part') assert.is(input[r.offset], 0x02);
    if (r.type === 'section-end') assert.is(input[r.offset], 0x03);
    if (r.type === 'section-footer') assert.is(input[r.offset], 0x7e);
  }
  const dev = records.filter((r) => r.type === 'device-state');
  assert.ok(dev.length >= 1);
  const firstDev = dev[0];
  if (firstDev.type !== 'device-state') return;
  assert.is(input[firstDev.offset], 0x04);
  // Device state chunks are contiguous and end right before EOF.
  let end = firstDev.offset;
  for (const d of dev) {
    if (d.type !== 'device-state') continue;
    assert.is(d.offset, end);
    assert.equal(d.data, input.subarray(d.offset, d.offset + d.data.length));
    end += d.data.length;
  }
  const eof = records.find((r) => r.type === 'eof');
  assert.ok(eof);
  assert.is(end, eof!.offset);
  assert.is(input[eof!.offset], 0x00);
  assert.is(input[eof!.offset - 5], 0x7e);
  const vd = records[records.length - 1];
  assert.is(vd.type, 'vmdescription');
  if (vd.type === 'vmdescription') {
    assert.equal(vd.json, { page_size: 4096, devices: [{ name: 'timer' }, { name: 'cpu' }] });
    assert.is(vd.offset, eof!.offset + 1);
    assert.is(vd.offset + 5 + vd.raw.length, input.length);
  }
});

test('page data is a view into the input chunk, not a copy', async () => {
  const input = completeStream();
  const records = await frame(input);
  const page = records.find((r) => r.type === 'ram-page');
  assert.ok(page && page.type === 'ram-page');
  if (page?.type === 'ram-page') assert.is(page.data.buffer, input.buffer);
});

test('identical records for 1-byte chunks and random chunkings (fixed seed)', async () => {
  for (const vmdesc of [true, false]) {
    const input = completeStream({ vmdesc, postcopy: true });
    const whole = normalize(await frame(input));
    assert.equal(normalize(await frame(input, [1])), whole);
    const rnd = prng(1234 + (vmdesc ? 1 : 0));
    for (let round = 0; round < 20; round++) {
      const max = [3, 17, 700, 5000][round % 4];
      assert.equal(normalize(await frame(input, () => 1 + Math.floor(rnd() * max))), whole, `round ${round}`);
    }
  }
});

test('page runs: expanded, the same records as one per page, for any chunking (fixed seed)', async () => {
  const input = completeStream({ postcopy: true });
  const whole = normalize(await frame(input));
  const expand = (records: MigrationRecord[]): MigrationRecord[] =>
    (records as FramedRecord[]).flatMap((r) => (r.type === 'ram-page-run' ? expandPageRun(r, 4096) : [r]));
  const runs = (await frame(input, [input.length], { pageRuns: true })) as FramedRecord[];
  const longest = Math.max(0, ...runs.map((r) => (r.type === 'ram-page-run' ? r.count : 0)));
  assert.ok(longest > 1, 'one chunk: the pages come as runs');
  for (const r of runs) {
    if (r.type === 'ram-page-run') assert.is(r.source.buffer, input.buffer, 'a run points into the input chunk');
  }
  assert.equal(normalize(expand(runs as MigrationRecord[])), whole);
  const rnd = prng(99);
  for (let round = 0; round < 20; round++) {
    const max = [3, 17, 700, 5000, 70000][round % 5];
    const got = await frame(input, () => 1 + Math.floor(rnd() * max), { pageRuns: true });
    assert.equal(normalize(expand(got)), whole, `round ${round}`);
  }
});

test('vmdescription absent: stream ends with footer + EOF', async () => {
  const records = await frame(completeStream({ vmdesc: false }));
  assert.is(records[records.length - 1].type, 'eof');
  assert.not.ok(records.some((r) => r.type === 'vmdescription'));
});

test('postcopy source commands at the start: OPEN_RETURN_PATH, PING, POSTCOPY_ADVISE', async () => {
  const records = await frame(completeStream({ postcopy: true }));
  const cmds = records.filter((r) => r.type === 'command');
  assert.equal(cmds.map((c) => c.type === 'command' ? [c.command, c.name, c.payload.toString('hex')] : []), [
    [1, 'OPEN_RETURN_PATH', ''],
    [2, 'PING', '00000001'],
    [3, 'POSTCOPY_ADVISE', '0000000000001000' + '0000000000001000'],
  ]);
  // Commands come before the ram START.
  const start = records.findIndex((r) => r.type === 'section-start');
  assert.ok(records.findIndex((r) => r.type === 'command') < start);
});

test('configuration subsections: target page bits sets the page size; capabilities; uuid', async () => {
  const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
  const b = new StreamBuilder(16384).header().configuration('virt-7.2', { pageBits: 14, capabilities: ['x-ignore-shared'], uuid });
  b.sectionStart(0).memSize([{ id: 'mach-virt.ram', length: 4 * 16384, extras: [0x40000000] }]).eos().footer(0);
  b.sectionEnd(0).page(16384, 'mach-virt.ram').eos().footer(0).device(1, 'cpu', Buffer.from([1])).eof();
  const records = await frame(b.build());
  const cfg = records[1];
  assert.is(cfg.type, 'configuration');
  if (cfg.type !== 'configuration') return;
  assert.is(cfg.machine, 'virt-7.2');
  assert.is(cfg.pageSize, 16384);
  assert.equal(cfg.subsections, [
    { name: 'configuration/target-page-bits', versionId: 1, targetPageBits: 14 },
    { name: 'configuration/capabilities', versionId: 1, capabilities: ['x-ignore-shared'] },
    { name: 'configuration/uuid', versionId: 1, uuid: '00112233-4455-6677-8899-aabbccddeeff' },
  ]);
  const mem = records.find((r) => r.type === 'ram-mem-size');
  if (mem?.type === 'ram-mem-size') assert.equal(mem.blocks[0], { id: 'mach-virt.ram', length: 65536, index: 0, mrAddr: 0x40000000 });
  else assert.unreachable('no mem size');
  const page = records.find((r) => r.type === 'ram-page');
  assert.ok(page?.type === 'ram-page' && page.data.length === 16384 && page.address === 16384);
});

test('MEM_SIZE per-block extras: page size (postcopy huge pages), and GPA of the last block before EOS', async () => {
  const blocks = [
    { id: 'pc.ram', length: 8 * 4096, extras: [2 * 1024 * 1024] },
    { id: 'vga.vram', length: 4096 },
    { id: 'last', length: 4096, extras: [2 * 1024 * 1024, 0] },
  ];
  const b = new StreamBuilder().header().configuration().postcopyAdvise(2 * 1024 * 1024 | 4096)
    .sectionStart(2).memSize(blocks).eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'x', Buffer.alloc(1)).eof();
  const records = await frame(b.build(), [1]);
  const mem = records.find((r) => r.type === 'ram-mem-size');
  if (mem?.type !== 'ram-mem-size') return assert.unreachable('no mem size');
  assert.equal(mem.blocks, [
    { id: 'pc.ram', length: 32768, index: 0, pageSize: 2097152 },
    { id: 'vga.vram', length: 4096, index: 1 },
    { id: 'last', length: 4096, index: 2, pageSize: 2097152, mrAddr: 0 },
  ]);
});

test('tailComplete(): only when the input ends exactly with footer+EOF(+VMDESCRIPTION)', async () => {
  const input = completeStream();
  const eofAt = input.lastIndexOf(Buffer.from([0x7e, 0, 0, 0, 4, 0])) + 6;
  const framer = new MigrationFramer();
  const seen: boolean[] = [];
  framer.on('data', () => {});
  const cuts = [20, eofAt - 1, eofAt, eofAt + 1, eofAt + 3, input.length - 1, input.length];
  let pos = 0;
  for (const cut of cuts) {
    framer.write(input.subarray(pos, cut));
    pos = cut;
    await new Promise((r) => setImmediate(r));
    seen.push(framer.tailComplete());
  }
  // footer+EOF alone looks complete (a source without VM description stops there).
  assert.equal(seen, [false, false, true, false, false, false, true]);
  framer.destroy();
});

test('onQemuTail: called once, when the bytes end with a tail carrying QEMU\'s VMDESCRIPTION; not for EOF alone or another JSON', async () => {
  const feed = async (input: Buffer, cuts: number[]): Promise<number[]> => {
    const calls: number[] = [];
    let pos = 0;
    const framer = new MigrationFramer({ onQemuTail: () => calls.push(pos) });
    framer.on('data', () => {});
    for (const cut of [...cuts, input.length]) {
      framer.write(input.subarray(pos, cut));
      pos = cut;
      await new Promise((r) => setImmediate(r));
    }
    framer.destroy();
    return calls;
  };
  const input = completeStream();
  const eofAt = input.lastIndexOf(Buffer.from([0x7e, 0, 0, 0, 4, 0])) + 6;
  // Not at footer+EOF, not mid-description, but as the last byte lands: once.
  assert.equal(await feed(input, [20, eofAt, eofAt + 3, input.length - 1]), [input.length]);
  // The device bodies' tail look-alikes (0x7e .. 0x00 0x06 .. {}) never trigger it, in any chunking.
  assert.equal(await feed(input, Array.from({ length: input.length - 1 }, (_v, i) => i + 1)), [input.length]);
  assert.equal(await feed(completeStream({ vmdesc: false }), []), []);
  // A description that is not QEMU's (no page_size and devices) is left to the quiet period.
  const other = leader().sectionEnd(2).eos().footer(2).device(3, 'dev', Buffer.alloc(10, 1)).eof().vmdesc({ a: 1 }).build();
  assert.equal(await feed(other, []), []);
});

test('a device body holding a fake tail with a long declared length does not swallow the real tail', async () => {
  const fake = Buffer.concat([Buffer.from([0x7e, 0, 0, 0, 9, 0, 0x06]), Buffer.from([0, 0, 0x10, 0]), Buffer.from('{"fake":1}')]);
  const b = leader().sectionEnd(2).eos().footer(2).device(3, 'dev', fake).device(4, 'dev2', Buffer.alloc(100, 1)).eof().vmdesc({ a: 1 });
  const input = b.build();
  for (const chunks of [[input.length], [1], [7]]) {
    const records = await frame(input, chunks);
    const vd = records[records.length - 1];
    assert.ok(vd.type === 'vmdescription' && (vd.json as { a: number }).a === 1);
  }
});

// ---- malformed input: one StreamFormatError each ----

test('error: bad magic', async () => {
  await expectError(new StreamBuilder().header(3, 0x12345678).build(), /bad magic 0x12345678/, 0);
});

test('error: version 2 is obsolete', async () => {
  await expectError(new StreamBuilder().header(2).build(), /version 2 is obsolete/, 4);
});

test('error: unknown token', async () => {
  const b = new StreamBuilder().header().configuration();
  const at = b.length;
  await expectError(b.raw([0x42]).build(), /unknown token 0x42/, at);
});

test('error: unknown RAM flags', async () => {
  const b = leader().sectionPart(2);
  const at = b.length;
  await expectError(b.ramHeader(0, 0x400).build(), /unknown RAM flags 0x400 in section ram/, at);
});

test('error: HOOK is unsupported (XBZRLE and compressed pages are decoded: xbzrle.test)', async () => {
  for (const [flag, re] of [[0x80, /RDMA hook/]] as const) {
    const b = leader().sectionPart(2);
    const at = b.length;
    await expectError(b.ramHeader(0, flag).raw(Buffer.alloc(20)).build(), re, at);
  }
});

test('error: RAM record for an unknown block', async () => {
  const b = leader().sectionPart(2);
  const at = b.length;
  await expectError(b.page(0, 'nope').build(), /unknown block "nope"/, at);
});

test('error: RAM page past the end of its block', async () => {
  const b = leader().sectionPart(2).page(0, 'pc.ram');
  const at = b.length;
  await expectError(b.page(16 * 4096, null).build(), /past the end of block "pc.ram"/, at);
  const z = leader().sectionPart(2);
  await expectError(z.zero(2 * 4096, '/rom@etc/acpi/tables').build(), /past the end/);
});

test('error: CONTINUE without a previous block', async () => {
  await expectError(leader().sectionPart(2).page(0, null).build(), /CONTINUE but no previous block/);
});

test('error: iterable sections other than ram are rejected by name', async () => {
  for (const name of ['block', 'dirty-bitmap']) {
    const b = new StreamBuilder().header().configuration();
    const at = b.length;
    await expectError(b.sectionStart(1, name).build(), new RegExp(`iterable section "${name}" is not supported`), at);
  }
});

test('error: second START of ram', async () => {
  const b = leader();
  const at = b.length;
  await expectError(b.sectionStart(5).build(), /second START of section ram/, at);
});

test('error: missing and mismatched footers', async () => {
  await expectError(leader(new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().raw([0x02, 0, 0, 0, 2])).build(), /missing section footer/);
  await expectError(new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(7).build(), /mismatched section footer: id 7, expected 2/);
});

test('error: PART for a section that was never started', async () => {
  await expectError(leader().sectionPart(9).build(), /section id 9, which was never started/);
});

test('error: idstr length that runs past the data (truncated)', async () => {
  const input = leader().sectionPart(2).raw(Buffer.concat([Buffer.from('0000000000000008', 'hex'), Buffer.from([200]), Buffer.from('pc.ram')])).build();
  await expectError(input, /ends in the middle of a record/);
  await expectError(input, /ends in the middle of a record/, undefined, [1]);
});

test('error: stream that ends mid-record, mid-page, or without EOF', async () => {
  const full = completeStream();
  const e1 = await expectError(full.subarray(0, 3), /middle of a record/);
  assert.is(e1.offset, 0);
  const page = leader().sectionPart(2).page(0, 'pc.ram').build();
  await expectError(page.subarray(0, page.length - 1), /middle of a record/, undefined, [100]);
  await expectError(leader().sectionPart(2).build(), /ends before EOF/);
  // Device state that never reaches an EOF tail.
  const noEof = leader().sectionEnd(2).eos().footer(2).device(3, 'dev', Buffer.alloc(10)).build();
  await expectError(noEof, /without a section footer and EOF/, noEof.length);
  // Truncated inside the VM description.
  await expectError(full.subarray(0, full.length - 3), /without a section footer and EOF/);
});

test('error: unknown command id; wrong command length; PACKAGED', async () => {
  const b = new StreamBuilder().header().configuration();
  const at = b.length;
  await expectError(b.command(99).build(), /unknown command id 99/, at);
  await expectError(new StreamBuilder().header().command(2, Buffer.alloc(3)).build(), /PING has length 3, expected 4/);
  await expectError(new StreamBuilder().header().command(3, Buffer.alloc(8)).build(), /POSTCOPY_ADVISE has length 8/);
  await expectError(new StreamBuilder().header().command(7, Buffer.alloc(4)).build(), /PACKAGED/);
});

test('error: absurd values in MEM_SIZE and configuration', async () => {
  const start = () => new StreamBuilder().header().configuration().sectionStart(2);
  await expectError(start().memSize([{ id: 'x', length: 4096 }], 17 * 1024 ** 4).build(), /absurd MEM_SIZE total/);
  const many = Array.from({ length: 1001 }, (_, i) => ({ id: `b${i}`, length: 4096 }));
  await expectError(start().memSize(many).eos().build(), /more than 1000 RAM blocks/);
  await expectError(start().memSize([{ id: 'a', length: 8192 }], 4096).build(), /exceed the MEM_SIZE total/);
  await expectError(start().memSize([{ id: 'a', length: 8192, extras: [3000] }, { id: 'b', length: 4096 }]).eos().build(), /invalid page size 3000/);
  await expectError(new StreamBuilder().header().configuration('pc', { pageBits: 20 }).build(), /target page bits 20 out of range/);
  assert.throws(() => new MigrationFramer({ pageSize: 1000 }), /invalid page size 1000/);
});

test('error: device section before the end of ram; MULTIFD_FLUSH is accepted', async () => {
  await expectError(leader().device(3, 'cpu', Buffer.alloc(4)).eof().build(), /device section "cpu" arrives before the end of the ram section/);
  const ok = await frame(leader().sectionPart(2).multifdFlush().eos().footer(2).sectionEnd(2).eos().footer(2).device(3, 'd', Buffer.alloc(1)).eof().build());
  assert.ok(ok.some((r) => r.type === 'ram-multifd-flush'));
});

test('background-snapshot layout: device state right after a ram PART (no END) is accepted and flagged', async () => {
  // bg_migration_thread: setup and iteration sections, then the buffered device state.
  const input = leader().sectionPart(2).page(4096, 'pc.ram').zero(0, null).eos().footer(2)
    .sectionPart(2).page(0, '/rom@etc/acpi/tables').eos().footer(2)
    .device(3, 'timer', Buffer.from([1, 2, 3])).eof().vmdesc({ page_size: 4096, devices: [] }).build();
  const framer = new MigrationFramer();
  const records: string[] = [];
  await new Promise<void>((resolve, reject) => {
    framer.on('data', (r: unknown) => records.push((r as { type: string }).type));
    framer.on('error', reject);
    framer.on('end', resolve);
    framer.end(input);
  });
  assert.ok(framer.backgroundSnapshot);
  assert.ok(records.includes('device-state') && records.includes('vmdescription'));
  // A plain precopy stream is not flagged.
  const plain = new MigrationFramer();
  await new Promise<void>((resolve, reject) => {
    plain.on('data', () => {});
    plain.on('error', reject);
    plain.on('end', resolve);
    plain.end(completeStream());
  });
  assert.not.ok(plain.backgroundSnapshot);
  // The setup section alone is not RAM: still refused.
  await expectError(leader().device(3, 'cpu', Buffer.alloc(4)).eof().build(), /arrives before the end of the ram section/);
});

test('an error destroys the framer once, and later input is ignored', async () => {
  const framer = new MigrationFramer();
  const errors: Error[] = [];
  framer.on('error', (e: Error) => errors.push(e));
  framer.on('data', () => {});
  framer.write(Buffer.from('nope nope nope'));
  framer.write(Buffer.from('more'));
  await new Promise((r) => setTimeout(r, 20));
  assert.is(errors.length, 1);
  assert.instance(errors[0], StreamFormatError);
  assert.ok(framer.destroyed);
});

test('a damaged block name is quoted with its control bytes escaped: the error stays one line', async () => {
  const input = leader().sectionPart(2).page(0, 'bad\nname\x01' + 'x'.repeat(200)).build();
  const err = await expectError(input, /unknown block "bad\\x0aname\\x01x+…"/);
  assert.not.match(err.message, /\n/);
  assert.ok(err.message.length < 200, err.message);
});

test.run();
