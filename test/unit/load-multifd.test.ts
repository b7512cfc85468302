// The load encoder with a multifd page sink (restore --qmp --channels): data
// pages leave the main stream for the sink, zero pages stay, and the sink
// hears of every sync mark the destination will wait at, after the main
// stream went out past it, in the order the destination meets them.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { LoadEncoder, MultifdPageSink } from '../../src/snapshot/load-encoder';
import type { BlockRead } from '../../src/blockio';
import { RamFlag } from '../../src/migration/constants';

const PAGE = 4096;
const blocks = [
  { id: 'pc.ram', offset: 0, length: 64 * PAGE },
  { id: '/rom@etc/acpi/tables', offset: 1 << 20, length: 8 * PAGE },
];

/** Pages i of `data` are data when `dataPages` has i, zeros otherwise. */
function read(offset: number, pages: number, dataPages: number[], tag: number): BlockRead {
  const data = Buffer.alloc(pages * PAGE);
  for (const i of dataPages) data.fill(i + 1, i * PAGE, (i + 1) * PAGE);
  return { offset, length: pages * PAGE, data, tag } as BlockRead;
}

/**
 * Counts flag-only RAM records (be64 with just `flag`): an EOS is always
 * followed by a section footer (0x7e), a MULTIFD_FLUSH by an EOS. The
 * follower keeps a zero record's address bytes from matching.
 */
function countRecords(stream: Buffer, flag: number): number {
  let n = 0;
  for (let i = 0; i + 9 <= stream.length; i++) {
    if (stream.readUInt32BE(i) !== 0 || stream.readUInt32BE(i + 4) !== flag) continue;
    if (flag === RamFlag.EOS ? stream[i + 8] === 0x7e : i + 16 <= stream.length && stream.readUInt32BE(i + 8) === 0 && stream.readUInt32BE(i + 12) === RamFlag.EOS) n++;
  }
  return n;
}

async function run(marks: 'eos' | 'flush', sectionLimitHit = false) {
  const events: string[] = [];
  const out: Buffer[] = [];
  let mainBytesAtSync: number[] = [];
  let mainBytes = 0;
  const sink: MultifdPageSink = {
    marks,
    page: (block, address, data, at) => events.push(`page ${block} 0x${address.toString(16)} ${data[at]}`),
    sync: () => {
      events.push('sync');
      mainBytesAtSync.push(mainBytes);
    },
    whenWritable: () => null,
  };
  const enc = new LoadEncoder({
    blocks,
    pageSize: PAGE,
    ramSectionId: 3,
    prefix: [Buffer.from('LEADER')],
    suffix: () => [Buffer.from('DEVICES')],
    sink: (chunk) => {
      out.push(Buffer.from(chunk));
      mainBytes += chunk.length;
    },
    multifd: sink,
  });
  enc.begin();
  enc.encode(read(0, 4, [1, 3], 0));
  if (sectionLimitHit) events.push('--');
  enc.encode(read(1 << 20, 2, [0], 1));
  await enc.finish();
  return { events, stream: Buffer.concat(out), mainBytesAtSync, enc };
}

test("'flush' marks: data pages to the sink, zero pages on the main stream, one MULTIFD_FLUSH after the last page, one sync for it", async () => {
  const { events, stream, mainBytesAtSync, enc } = await run('flush');
  assert.equal(events, ['page pc.ram 0x1000 2', 'page pc.ram 0x3000 4', 'page /rom@etc/acpi/tables 0x0 1', 'sync']);
  assert.is(enc.dataPagesSent, 3);
  assert.is(enc.zeroPagesSent, 3);
  assert.is(countRecords(stream, RamFlag.MULTIFD_FLUSH), 1, 'one MULTIFD_FLUSH record');
  const flushAt = stream.indexOf(Buffer.from([0, 0, 0, 0, 0, 0, 2, 0]));
  assert.ok(mainBytesAtSync[0] > flushAt, 'the FLUSH went out before the sync');
  assert.ok(stream.indexOf('DEVICES') > flushAt, 'the device state after it');
  assert.ok(stream.length < 200, `no page data on the main stream (${stream.length} bytes)`);
});

test("'eos' marks: a sync for every RAM EOS (the PART section's and the END section's), none for a FLUSH", async () => {
  const { events, stream, mainBytesAtSync } = await run('eos');
  assert.equal(events.filter((e) => e === 'sync').length, countRecords(stream, RamFlag.EOS), 'one sync per EOS');
  assert.is(countRecords(stream, RamFlag.EOS), 2);
  assert.is(countRecords(stream, RamFlag.MULTIFD_FLUSH), 0);
  assert.is(events[events.length - 1], 'sync');
  assert.ok(mainBytesAtSync.every((b) => b <= stream.indexOf('DEVICES')), 'syncs before the device state');
  // Each sync comes after its EOS went out.
  const eosEnds: number[] = [];
  for (let i = 0; i + 9 <= stream.length; i++) if (stream.readUInt32BE(i) === 0 && stream.readUInt32BE(i + 4) === RamFlag.EOS && stream[i + 8] === 0x7e) eosEnds.push(i + 8);
  assert.is(eosEnds.length, 2);
  eosEnds.forEach((end, k) => assert.ok(mainBytesAtSync[k] >= end, `sync ${k} after EOS ${k}`));
});

test("'eos' marks with only data pages: no PART section is opened, the END section's EOS is the one sync", async () => {
  const events: string[] = [];
  const out: Buffer[] = [];
  const enc = new LoadEncoder({
    blocks,
    pageSize: PAGE,
    ramSectionId: 3,
    prefix: [],
    suffix: () => [],
    sink: (chunk) => out.push(Buffer.from(chunk)),
    multifd: { marks: 'eos', page: () => events.push('page'), sync: () => events.push('sync'), whenWritable: () => null },
  });
  enc.begin();
  enc.encode(read(0, 2, [0, 1], 0));
  await enc.finish();
  assert.equal(events, ['page', 'page', 'sync']);
  assert.is(countRecords(Buffer.concat(out), RamFlag.EOS), 1);
});

test('backpressure: the stream side of the encoder waits for the sink before taking the next range', async () => {
  let release: () => void = () => undefined;
  let waits = 0;
  let pages = 0;
  const enc = new LoadEncoder({
    blocks,
    pageSize: PAGE,
    ramSectionId: 3,
    prefix: [],
    suffix: () => [],
    multifd: {
      marks: 'flush',
      page: () => pages++,
      sync: () => undefined,
      whenWritable: () => {
        waits++;
        return new Promise<void>((r) => (release = r));
      },
    },
  });
  enc.on('data', () => undefined);
  enc.write(read(0, 1, [0], 0));
  enc.write(read(PAGE, 1, [0], 0));
  await new Promise((r) => setTimeout(r, 20));
  assert.equal([pages, waits], [1, 1], 'the second range waits for the sink');
  release();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal([pages, waits], [2, 2]);
  release();
});

test.run();
