// The multifd channel codec against hand-built channels shaped like the ones
// QEMU 7.2 and 10.0 send (test/e2e/multifd.test.ts checks real ones).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MultifdRecord, MultifdPacketRecord, MULTIFD_MAGIC } from '../../src/migration/multifd';
import { init, packet, PacketSpec, parseChannel } from './multifd-packets';

const PAGE = 4096;
const SLOTS = (512 * 1024) / PAGE;
const BLOCKS: Record<string, number> = { 'pc.ram': 64 << 20, '/rom@etc/acpi/tables': 128 << 10 };

function parse(bytes: Buffer, cut = 0): Promise<MultifdRecord[]> {
  return parseChannel(bytes, BLOCKS, cut);
}

const packets = (rs: MultifdRecord[]) => rs.filter((r): r is MultifdPacketRecord => r.type === 'multifd-packet');

// 7.2: SYNC packets carry pages_alloc and a stale next_packet_size; no zero pages.
const channel72 = Buffer.concat([
  init(1),
  packet({ flags: 1, num: 0, next: 0 }),
  packet({ block: 'pc.ram', normal: [0x2000000, 0x2001000, 0x3000000], num: 2 }),
  packet({ flags: 1, block: 'pc.ram', num: 4, next: 3 * PAGE }),
  packet({ block: 'pc.ram', normal: [0x2001000], num: 6 }),
]);
// 10.0: zero pages listed after the normal ones; SYNC packets have pages_alloc 0.
const channel10 = Buffer.concat([
  init(0),
  packet({ flags: 1, alloc: 0 }),
  packet({ block: 'pc.ram', normal: [0x1000], zero: [0x2000, 0x3000], num: 1 }),
  packet({ block: '/rom@etc/acpi/tables', zero: [0], num: 3 }),
  packet({ flags: 1, alloc: 0, num: 5 }),
]);

test('a 7.2-shaped channel: init, pages with their data, SYNC packets as epoch marks', async () => {
  const rs = await parse(channel72);
  assert.equal(rs[0], { type: 'multifd-init', channel: 1, uuid: Buffer.alloc(16) });
  const ps = packets(rs);
  assert.equal(ps.map((p) => [p.sync, p.epoch, p.packetNum, p.block, p.normal, p.zero, p.data.length]), [
    [true, 0, 0, '', [], [], 0],
    [false, 1, 2, 'pc.ram', [0x2000000, 0x2001000, 0x3000000], [], 3 * PAGE],
    [true, 1, 4, 'pc.ram', [], [], 0],
    [false, 2, 6, 'pc.ram', [0x2001000], [], PAGE],
  ]);
  assert.is(ps[1].data[2 * PAGE], 0x3000000 / PAGE & 0xff, 'page data in offset order');
});

test('a 10.0-shaped channel: zero pages after the normal ones, in any block announced', async () => {
  const ps = packets(await parse(channel10));
  assert.equal(ps.map((p) => [p.block, p.normal, p.zero]), [
    ['', [], []],
    ['pc.ram', [0x1000], [0x2000, 0x3000]],
    ['/rom@etc/acpi/tables', [], [0]],
    ['', [], []],
  ]);
});

test('the same records whatever the chunking', async () => {
  const whole = await parse(channel72);
  for (const cut of [1, 7, 64, 1000, 4096, 65536]) {
    const rs = await parse(channel72, cut);
    assert.equal(rs.map((r) => (r.type === 'multifd-packet' ? [r.offset, r.epoch, r.normal, r.data.toString('hex')] : r.channel)), whole.map((r) => (r.type === 'multifd-packet' ? [r.offset, r.epoch, r.normal, r.data.toString('hex')] : r.channel)), `cut ${cut}`);
  }
});

async function refusal(bytes: Buffer): Promise<string> {
  try {
    await parse(bytes);
  } catch (err) {
    return (err as Error).message;
  }
  assert.unreachable('the channel should be refused');
  return '';
}

test('refused: bad magic, unknown version, compression, unknown flags', async () => {
  const hdr = init(2);
  assert.match(await refusal(Buffer.concat([Buffer.from('QEVM'), hdr.subarray(4)])), /channel 2|channel \?/);
  assert.match(await refusal(Buffer.concat([Buffer.from('QEVM'), hdr.subarray(4)])), /at byte 0: channel header magic 0x5145564d is not multifd's 0x11223344/);
  const v2 = Buffer.from(hdr);
  v2.writeUInt32BE(2, 4);
  assert.match(await refusal(v2), /multifd version 2 is not supported/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ magic: 0xdeadbeef })])), /channel 2 at byte 64: packet magic 0xdeadbeef/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ version: 3 })])), /at byte 68: multifd packet version 3/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ flags: 1 << 2 })])), /multifd-compression zstd is not supported \(set multifd-compression none\)/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ flags: 1 << 1 })])), /multifd-compression zlib/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ flags: 1 << 6 })])), /unknown multifd packet flags 0x40/);
});

test('refused: a page beyond its block, unaligned, a block never announced, too many pages', async () => {
  const hdr = init(0);
  assert.match(await refusal(Buffer.concat([hdr, packet({ block: 'pc.ram', normal: [64 << 20] })])), /page offset 0x4000000 is past the end of block "pc.ram" \(length 0x4000000\)/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ block: 'pc.ram', zero: [0x10] })])), /page offset 0x10 is not page-aligned/);
  assert.match(await refusal(Buffer.concat([hdr, packet({ block: 'dimm1', normal: [0] })])), /RAM block "dimm1" was never announced by the main stream/);
  const many = packet({ block: 'pc.ram' });
  many.writeUInt32BE(SLOTS, 16);
  many.writeUInt32BE(1, 32);
  assert.match(await refusal(Buffer.concat([hdr, many])), new RegExp(`lists ${SLOTS} data and 1 zero pages, more than the ${SLOTS} a packet holds`));
});

test('refused: a channel cut short, in its header, a packet header or page data', async () => {
  assert.match(await refusal(init(0).subarray(0, 40)), /channel header cut short \(40 bytes left over\)/);
  assert.match(await refusal(Buffer.alloc(0)), /closed before its header/);
  const full = Buffer.concat([init(3), packet({ block: 'pc.ram', normal: [0, PAGE] })]);
  assert.match(await refusal(full.subarray(0, 64 + 100)), /channel 3 at byte 64: packet cut short \(100 bytes left over\)/);
  assert.match(await refusal(full.subarray(0, full.length - 1)), /packet cut short/);
});

test.run();
