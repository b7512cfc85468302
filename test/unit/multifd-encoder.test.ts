// The multifd packet encoder, round-tripped through the channel parser that
// reads QEMU's own channels (multifd.ts), and byte-checked where QEMU checks.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MultifdRecord, MultifdPacketRecord, MULTIFD_HEADER_SIZE } from '../../src/migration/multifd';
import { parseChannel } from './multifd-packets';
import { MultifdPacketBuilder, encodeMultifdInit, encodeMultifdSync, parseUuid } from '../../src/migration/multifd-encoder';

const PAGE = 4096;
const BLOCKS: Record<string, number> = { 'pc.ram': 64 << 20, '/rom@etc/acpi/tables': 128 << 10 };

function parse(bytes: Buffer, cut = 0, pageSize = PAGE): Promise<MultifdRecord[]> {
  return parseChannel(bytes, BLOCKS, cut, pageSize);
}

function pageOf(seed: number, size = PAGE): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return b;
}

const uuid = parseUuid('5a1f2c3d-0000-4e5f-8a9b-0123456789ab');

test('init: magic, version, uuid and channel id where QEMU reads them; the parser takes it', async () => {
  const b = encodeMultifdInit(uuid, 3);
  assert.is(b.length, 64);
  assert.is(b.readUInt32BE(0), 0x11223344);
  assert.is(b.readUInt32BE(4), 1);
  assert.is(b.subarray(8, 24).toString('hex'), '5a1f2c3d00004e5f8a9b0123456789ab');
  assert.is(b[24], 3);
  assert.equal(await parse(b), [{ type: 'multifd-init', channel: 3, uuid }]);
  assert.throws(() => encodeMultifdInit(Buffer.alloc(15), 0), /16 bytes/);
  assert.throws(() => encodeMultifdInit(uuid, 256), /channel id/);
  assert.throws(() => parseUuid('not-a-uuid'), /not a uuid/);
});

test('packets round-trip: pages of two blocks, zero pages, SYNC marks; cut into 1000-byte writes too', async () => {
  const builder = new MultifdPacketBuilder(PAGE);
  const pages = [0, 1, 2, 127, 9].map((i) => pageOf(i));
  // One read buffer holding several pages, as the load path hands them over.
  const read = Buffer.concat(pages);
  const parts: Buffer[] = [encodeMultifdInit(uuid, 1), encodeMultifdSync(PAGE, 0)];
  builder.begin('pc.ram');
  builder.page(0x2000000, read, 0);
  builder.page(0x2001000, read, PAGE);
  builder.page(0x3ff_f000, read, 2 * PAGE);
  builder.zeroPage(0x5000);
  parts.push(builder.take(1));
  builder.begin('/rom@etc/acpi/tables');
  builder.page(0x1f000, read, 3 * PAGE);
  parts.push(builder.take(2));
  parts.push(encodeMultifdSync(PAGE, 3));
  builder.begin('pc.ram');
  builder.page(0x1000, read, 4 * PAGE);
  parts.push(builder.take(4));
  parts.push(builder.take(5, 1)); // SYNC from an empty builder
  const bytes = Buffer.concat(parts);
  for (const cut of [0, 1000]) {
    const rs = (await parse(bytes, cut)).filter((r): r is MultifdPacketRecord => r.type === 'multifd-packet');
    assert.equal(
      rs.map((p) => [p.packetNum, p.sync, p.epoch, p.block, p.normal, p.zero]),
      [
        [0, true, 0, '', [], []],
        [1, false, 1, 'pc.ram', [0x2000000, 0x2001000, 0x3ff_f000], [0x5000]],
        [2, false, 1, '/rom@etc/acpi/tables', [0x1f000], []],
        [3, true, 1, '', [], []],
        [4, false, 2, 'pc.ram', [0x1000], []],
        [5, true, 2, '', [], []],
      ],
    );
    assert.ok(rs[1].data.equals(Buffer.concat(pages.slice(0, 3))), 'page data in order');
    assert.ok(rs[2].data.equals(pages[3]));
    assert.ok(rs[4].data.equals(pages[4]));
  }
});

test('a full packet: 128 pages of 4 KiB (512 KiB), header fields as QEMU checks them', async () => {
  const builder = new MultifdPacketBuilder(PAGE);
  assert.is(builder.slots, 128);
  const data = Buffer.concat(Array.from({ length: 128 }, (_, i) => pageOf(i + 100)));
  builder.begin('pc.ram');
  for (let i = 0; i < 128; i++) builder.page((127 - i) * PAGE, data, i * PAGE);
  assert.ok(builder.full);
  assert.throws(() => builder.page(0, data, 0), /full/);
  const pkt = builder.take(77);
  assert.is(pkt.length, MULTIFD_HEADER_SIZE + 8 * 128 + 128 * PAGE);
  assert.is(pkt.readUInt32BE(8), 0, 'flags: no SYNC, no compression');
  assert.is(pkt.readUInt32BE(12), 128, 'pages_alloc');
  assert.is(pkt.readUInt32BE(16), 128, 'normal_pages');
  assert.is(pkt.readUInt32BE(20), 128 * PAGE, 'next_packet_size: the data that follows');
  assert.is(pkt.readUInt32BE(32), 0, 'zero_pages');
  assert.is(pkt.toString('latin1', 64, 70), 'pc.ram');
  assert.is(pkt[70], 0, 'block name NUL-terminated');
  const [, p] = (await parse(Buffer.concat([encodeMultifdInit(uuid, 0), pkt]))) as [MultifdRecord, MultifdPacketRecord];
  assert.is(p.normal.length, 128);
  assert.is(p.normal[0], 127 * PAGE);
  assert.ok(p.data.equals(data));
  // The builder starts clean after take(): a SYNC packet names no block and has no pages.
  const sync = builder.take(78, 1);
  assert.is(sync.length, MULTIFD_HEADER_SIZE + 8 * 128);
  assert.is(sync.readUInt32BE(16), 0);
  assert.is(sync[64], 0);
  assert.ok(sync.subarray(MULTIFD_HEADER_SIZE).equals(Buffer.alloc(8 * 128)), 'offset array zeroed');
});

test('packets are independent buffers: a taken packet is not overwritten by the next', () => {
  const builder = new MultifdPacketBuilder(PAGE);
  builder.begin('pc.ram');
  builder.page(0, pageOf(1), 0);
  const first = builder.take(0);
  const copy = Buffer.from(first);
  builder.begin('pc.ram');
  builder.page(PAGE, pageOf(2), 0);
  builder.take(1);
  assert.ok(first.equals(copy));
});

test('recycle: a packet handed back is filled again; one not handed back is left alone', () => {
  const builder = new MultifdPacketBuilder(PAGE);
  builder.begin('pc.ram');
  builder.page(0, pageOf(1), 0);
  const first = builder.take(0);
  const kept = Buffer.from(first);
  builder.begin('pc.ram');
  builder.page(PAGE, pageOf(2), 0);
  const second = builder.take(1);
  assert.ok(first.equals(kept), 'not recycled: untouched');
  builder.recycle(second);
  builder.begin('pc.ram');
  builder.page(2 * PAGE, pageOf(3), 0);
  const third = builder.take(2);
  assert.is(third.buffer, second.buffer, 'the recycled buffer is reused');
  assert.ok(first.equals(kept));
  builder.recycle(Buffer.alloc(10)); // not one of ours: ignored
  const sync = builder.take(3, 1);
  assert.is.not(sync.buffer, second.buffer);
});

test('other page sizes: 64 KiB pages, 8 slots', async () => {
  const ps = 64 << 10;
  const builder = new MultifdPacketBuilder(ps);
  assert.is(builder.slots, 8);
  builder.begin('pc.ram');
  builder.page(ps * 3, pageOf(5, ps), 0);
  const rs = await parse(Buffer.concat([encodeMultifdInit(uuid, 0), builder.take(0)]), 0, ps);
  const p = rs[1] as MultifdPacketRecord;
  assert.equal(p.normal, [ps * 3]);
  assert.ok(p.data.equals(pageOf(5, ps)));
  assert.throws(() => new MultifdPacketBuilder(3000), /power of two/);
  assert.throws(() => builder.begin(''), /1\.\.255/);
});

test.run();
