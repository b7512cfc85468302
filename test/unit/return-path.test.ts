import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  encodeSwitchoverAck,
  sourceKnowsSwitchoverAck,
  ReturnPathError,
  ReturnPathMsg,
  ReturnPathParser,
  ReturnPathParserOptions,
  ReturnPathResponder,
  encodePong,
  encodeReqPages,
  encodeReturnPathMessage,
  encodeShut,
} from '../../src/migration/return-path';
import { Command } from '../../src/migration/constants';

/** Feed chunks to a fresh parser; resolve with messages or reject with its error. */
function parse(chunks: Buffer[], opts?: ReturnPathParserOptions): Promise<ReturnPathMsg[]> {
  return new Promise((resolve, reject) => {
    const p = new ReturnPathParser(opts);
    const out: ReturnPathMsg[] = [];
    p.on('data', (m: unknown) => out.push(m as ReturnPathMsg));
    p.on('error', reject);
    p.on('end', () => resolve(out));
    for (const c of chunks) p.write(c);
    p.end(undefined);
  });
}

async function parseError(chunks: Buffer[], opts?: ReturnPathParserOptions): Promise<ReturnPathError> {
  try {
    await parse(chunks, opts);
  } catch (err) {
    assert.instance(err, ReturnPathError);
    return err as ReturnPathError;
  }
  throw new Error('parser accepted bad input');
}

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// What migrate_send_rp_* in QEMU 7.2 migration.c writes, computed by hand.
const SHUT0 = hex('0001 0004 00000000');
const PONG = hex('0002 0004 00000003');
const REQ_ID = hex('0003 0013 0000000002a6b000 00001000 06 70632e72616d'); // pc.ram, start 0x2a6b000
const REQ = hex('0004 000c 0000000002a6c000 00001000');

test('encoders write the exact bytes of migrate_send_rp_shut/pong/req_pages', () => {
  assert.equal(encodeShut(0), SHUT0);
  assert.equal(encodeShut(1), hex('0001 0004 00000001'));
  assert.equal(encodePong(3), PONG);
  assert.equal(encodePong(0xfeedbeef), hex('0002 0004 feedbeef'));
  assert.equal(encodeReqPages(0x2a6b000, 4096, 'pc.ram'), REQ_ID);
  assert.equal(encodeReqPages(0x2a6c000, 4096), REQ);
  assert.equal(encodeReturnPathMessage(7), hex('0007 0000'));
  assert.equal(encodeReqPages(0x1_0000_2000, 4096), hex('0004 000c 0000000100002000 00001000'));
});

test('parses a stream of messages in one chunk', async () => {
  const msgs = await parse([Buffer.concat([PONG, REQ_ID, REQ, SHUT0])]);
  assert.equal(msgs, [
    { type: 'pong', value: 3, at: 0 },
    { type: 'req-pages', offset: 0x2a6b000, length: 4096, rbName: 'pc.ram', block: 'pc.ram', at: 8 },
    { type: 'req-pages', offset: 0x2a6c000, length: 4096, rbName: null, block: 'pc.ram', at: 31 },
    { type: 'shut', status: 0, at: 47 },
  ]);
});

test('messages split at every byte position (two cuts) parse the same', async () => {
  const all = Buffer.concat([PONG, REQ_ID, REQ, encodeReqPages(0, 8192, 'vga.vram'), REQ, SHUT0]);
  const expected = await parse([all]);
  assert.is(expected.length, 6);
  assert.equal(expected[3], { type: 'req-pages', offset: 0, length: 8192, rbName: 'vga.vram', block: 'vga.vram', at: 47 });
  assert.equal((expected[4] as { block: string }).block, 'vga.vram');
  for (let i = 0; i <= all.length; i++) {
    for (let j = i; j <= all.length; j += 7) {
      const got = await parse([all.subarray(0, i), all.subarray(i, j), all.subarray(j)]);
      assert.equal(got, expected, `cuts at ${i}, ${j}`);
    }
  }
  // One byte at a time.
  const bytes: Buffer[] = [];
  for (let i = 0; i < all.length; i++) bytes.push(all.subarray(i, i + 1));
  assert.equal(await parse(bytes), expected);
});

test('other known types: RECV_BITMAP, RESUME_ACK, SWITCHOVER_ACK', async () => {
  const msgs = await parse([
    Buffer.concat([
      encodeReturnPathMessage(5, hex('06 70632e72616d')),
      encodeReturnPathMessage(6, hex('00000001')),
      encodeReturnPathMessage(7),
    ]),
  ]);
  assert.equal(msgs, [
    { type: 'recv-bitmap', block: 'pc.ram', at: 0 },
    { type: 'resume-ack', value: 1, at: 11 },
    { type: 'switchover-ack', at: 19 },
  ]);
});

test('unknown types are errors naming the type and offset', async () => {
  let e = await parseError([Buffer.concat([PONG, hex('0009 0000')])]);
  assert.is(e.offset, 8);
  assert.is(e.messageType, 9);
  assert.match(e.message, /byte 8/);
  assert.match(e.message, /unknown message type 0x0009/);
  e = await parseError([hex('0000 0004 00000000')]);
  assert.match(e.message, /byte 0: unknown message type 0x0000/);
});

test('wrong lengths per rp_cmd_args are errors', async () => {
  let e = await parseError([hex('0001 0002 0000')]);
  assert.match(e.message, /SHUT with length 2, expected 4/);
  e = await parseError([Buffer.concat([SHUT0, hex('0004 000d 00000000000000000000100000')])]);
  assert.is(e.offset, 8);
  assert.match(e.message, /REQ_PAGES with length 13, expected 12/);
  // REQ_PAGES_ID whose u8 name length disagrees with the message length.
  e = await parseError([hex('0003 0010 0000000000000000 00001000 06 706372')]);
  assert.match(e.message, /REQ_PAGES_ID with length 16, expected 19/);
  // Over QEMU's 512-byte buffer: rejected from the header alone.
  e = await parseError([hex('0005 0201')]);
  assert.match(e.message, /RECV_BITMAP with length 513, expected at most 512/);
  e = await parseError([hex('0002 0000')]);
  assert.match(e.message, /PONG with length 0/);
});

test('REQ_PAGES without a prior REQ_PAGES_ID is an error', async () => {
  const e = await parseError([Buffer.concat([PONG, REQ])]);
  assert.is(e.offset, 8);
  assert.match(e.message, /REQ_PAGES before any REQ_PAGES_ID/);
});

test('truncated message at end of input is an error', async () => {
  let e = await parseError([Buffer.concat([PONG, REQ_ID.subarray(0, 10)])]);
  assert.is(e.offset, 8);
  assert.match(e.message, /ended inside a REQ_PAGES_ID message \(6 of 19 payload bytes\)/);
  e = await parseError([hex('00')]);
  assert.match(e.message, /after 1 of 4 header bytes/);
});

test('validation: unknown block, past the end, misaligned, empty', async () => {
  const opts = { blocks: new Map([['pc.ram', 0x1000_0000], ['pc.bios', 0x40000]]), pageSize: 4096 };
  assert.is((await parse([REQ_ID, REQ], opts)).length, 2);
  // Last page of a block is fine; one past is not.
  assert.is((await parse([encodeReqPages(0x3f000, 4096, 'pc.bios')], opts)).length, 1);
  let e = await parseError([encodeReqPages(0x40000, 4096, 'pc.bios')], opts);
  assert.match(e.message, /block pc\.bios offset 0x40000 length 0x1000: past the block's end \(0x40000 bytes\)/);
  e = await parseError([encodeReqPages(0x3f000, 8192, 'pc.bios')], opts);
  assert.match(e.message, /past the block's end/);
  e = await parseError([Buffer.concat([REQ_ID, encodeReqPages(0, 4096, 'nope')])], opts);
  assert.is(e.offset, REQ_ID.length);
  assert.match(e.message, /block nope offset 0x0 length 0x1000: unknown RAM block/);
  e = await parseError([encodeReqPages(0x800, 4096, 'pc.ram')], opts);
  assert.match(e.message, /not aligned to the 4096-byte page size/);
  e = await parseError([encodeReqPages(0x1000, 100, 'pc.ram')], opts);
  assert.match(e.message, /not aligned/);
  e = await parseError([encodeReqPages(0x1000, 0, 'pc.ram')], opts);
  assert.match(e.message, /empty request/);
  // REQ_PAGES resolves to the last named block and is checked against it.
  e = await parseError([Buffer.concat([encodeReqPages(0, 4096, 'pc.bios'), encodeReqPages(0x40000, 4096)])], opts);
  assert.match(e.message, /REQ_PAGES for block pc\.bios offset 0x40000/);
});

test('responder answers PING with PONG after OPEN_RETURN_PATH, SHUT once', () => {
  const r = new ReturnPathResponder();
  assert.is(r.shut(), null, 'no SHUT when the source never opened the return path');
  const ping = hex('00000001');
  assert.throws(() => r.onCommand(Command.PING, ping, 42), (e: Error) => e instanceof ReturnPathError && /byte 42: PING 0x1 received before OPEN_RETURN_PATH/.test(e.message));
  assert.is(r.onCommand(Command.OPEN_RETURN_PATH, Buffer.alloc(0)), null);
  assert.ok(r.opened);
  assert.equal(r.onCommand(Command.PING, ping), hex('0002 0004 00000001'));
  assert.is(r.onCommand(Command.POSTCOPY_ADVISE, Buffer.alloc(16)), null);
  assert.throws(() => r.onCommand(Command.PING, hex('0001')), /PING command with a 2-byte payload/);
  assert.equal(r.shut(), SHUT0);
  assert.ok(r.shutSent);
  assert.is(r.shut(), null);
  assert.is(r.onCommand(Command.PING, ping), null, 'nothing after SHUT');
});

test('responder output parses back', async () => {
  const r = new ReturnPathResponder();
  r.onCommand(Command.OPEN_RETURN_PATH, Buffer.alloc(0));
  const bytes = Buffer.concat([r.onCommand(Command.PING, hex('00000007'))!, r.shut(1)!]);
  assert.equal(await parse([bytes]), [
    { type: 'pong', value: 7, at: 0 },
    { type: 'shut', status: 1, at: 8 },
  ]);
});

test('SWITCHOVER_ACK: type 7, no payload; sent only to sources whose machine type proves QEMU >= 8.1', () => {
  assert.equal([...encodeSwitchoverAck()], [0, 7, 0, 0]);
  for (const m of ['pc-i440fx-8.1', 'pc-q35-10.0', 'pc-i440fx-9.2', 'pc-q35-8.2']) assert.ok(sourceKnowsSwitchoverAck(m), m);
  for (const m of ['pc-i440fx-7.2', 'pc-q35-8.0', 'pc-i440fx-2.12', 'microvm', 'isapc', 'none']) assert.not.ok(sourceKnowsSwitchoverAck(m), m);
  assert.not.ok(sourceKnowsSwitchoverAck(null));
});

test.run();
