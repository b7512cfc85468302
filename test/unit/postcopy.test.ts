import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  MAX_PACKAGED_SIZE,
  PostcopyEncodeError,
  encodeCommand,
  encodeListenPackage,
  encodeOpenReturnPath,
  encodePackaged,
  encodePing,
  encodePostcopyAdvise,
  encodePostcopyListen,
  encodePostcopyRun,
  encodeRamDiscard,
  maxDiscardRanges,
  unsentRanges,
} from '../../src/migration/postcopy';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// Expected bytes worked out by hand from qemu_savevm_command_send and the
// qemu_savevm_send_* functions of QEMU 7.2 savevm.c (token 0x08, be16 cmd,
// be16 len, payload).
test('fixed commands are byte-exact', () => {
  assert.equal(encodeOpenReturnPath(), hex('08 0001 0000'));
  assert.equal(encodePing(1), hex('08 0002 0004 00000001'));
  assert.equal(encodePing(0xffffffff), hex('08 0002 0004 ffffffff'));
  assert.equal(encodePostcopyListen(), hex('08 0004 0000'));
  assert.equal(encodePostcopyRun(), hex('08 0005 0000'));
  assert.equal(encodeCommand(9), hex('08 0009 0000'));
});

test('POSTCOPY_ADVISE: be64 page size summary, be64 target page size', () => {
  assert.equal(encodePostcopyAdvise(0x1000, 4096), hex('08 0003 0010 0000000000001000 0000000000001000'));
  // 4 KiB RAM plus a 2 MiB hugetlbfs block: the summary is the OR.
  assert.equal(encodePostcopyAdvise(0x201000n, 4096), hex('08 0003 0010 0000000000201000 0000000000001000'));
  assert.throws(() => encodePostcopyAdvise(-1, 4096), (e: Error) => e instanceof PostcopyEncodeError && /page size summary -1/.test(e.message));
});

test('POSTCOPY_RAM_DISCARD layout: version, counted name, nil, be64 byte pairs', () => {
  const [one, ...rest] = encodeRamDiscard('pc.ram', [{ start: 0x1a00000, length: 0xe600000 }]);
  assert.is(rest.length, 0);
  assert.equal(
    one,
    hex('08 0006 0019' + '00 06 70632e72616d 00' + '0000000001a00000 000000000e600000'),
  );
  const two = encodeRamDiscard('/rom@etc/acpi/rsdp', [
    { start: 0, length: 4096 },
    { start: 0x2_0000_0000, length: 0x1000 },
  ]);
  assert.equal(
    two[0],
    Buffer.concat([
      hex('08 0006'),
      hex((3 + 18 + 32).toString(16).padStart(4, '0')),
      hex('00 12'),
      Buffer.from('/rom@etc/acpi/rsdp'),
      hex('00 0000000000000000 0000000000001000 0000000200000000 0000000000001000'),
    ]),
  );
  assert.equal(encodeRamDiscard('pc.ram', []), []);
});

test('discards split at 12 ranges per command as QEMU does, or as asked', () => {
  const ranges = Array.from({ length: 25 }, (_, i) => ({ start: i * 0x2000, length: 0x1000 }));
  const cmds = encodeRamDiscard('pc.ram', ranges);
  assert.equal(cmds.map((c) => c.readUInt16BE(3)), [3 + 6 + 12 * 16, 3 + 6 + 12 * 16, 3 + 6 + 16]);
  // Every range appears once, in order.
  const seen: number[] = [];
  for (const c of cmds) {
    for (let p = 5 + 9; p < c.length; p += 16) seen.push(Number(c.readBigUInt64BE(p)));
  }
  assert.equal(seen, ranges.map((r) => r.start));
  assert.is(encodeRamDiscard('pc.ram', ranges, { maxRangesPerCommand: 25 }).length, 1);
  assert.is(encodeRamDiscard('pc.ram', ranges, { maxRangesPerCommand: 5 }).length, 5);
});

test('discard limits: be16 payload, names, alignment', () => {
  const name = 'x'.repeat(255);
  const fit = maxDiscardRanges(255);
  assert.is(fit, Math.floor((0xffff - 258) / 16));
  const ranges = Array.from({ length: fit }, (_, i) => ({ start: i * 4096, length: 4096 }));
  const [big] = encodeRamDiscard(name, ranges, { maxRangesPerCommand: fit });
  assert.is(big.readUInt16BE(3), 258 + 16 * fit);
  assert.ok(big.readUInt16BE(3) <= 0xffff);
  assert.throws(() => encodeRamDiscard(name, ranges, { maxRangesPerCommand: fit + 1 }), /maxRangesPerCommand 4080 must be 1\.\.4079/);
  assert.throws(() => encodeRamDiscard('', [{ start: 0, length: 4096 }]), /must be 1\.\.255 bytes/);
  assert.throws(() => encodeRamDiscard('y'.repeat(256), [{ start: 0, length: 4096 }]), /must be 1\.\.255 bytes/);
  assert.throws(() => encodeRamDiscard('pc.ram', [{ start: 0, length: 0 }]), /not a non-empty byte range/);
  assert.throws(() => encodeRamDiscard('pc.ram', [{ start: 0x800, length: 4096 }], { pageSize: 4096 }), /0x800\+0x1000 in block pc\.ram is not aligned to 4096 bytes/);
});

test('PACKAGED: be32 length of the inner bytes, inner buffers passed through', () => {
  const inner = [hex('0102'), hex('030405')];
  const out = encodePackaged(inner);
  assert.equal(out[0], hex('08 0007 0004 00000005'));
  assert.is(out[1], inner[0]);
  assert.is(out[2], inner[1]);
  const dev = hex('04 00000003');
  assert.equal(Buffer.concat(encodeListenPackage([dev])), hex('08 0007 0004 0000000f' + '08 0004 0000' + '04 00000003' + '08 0005 0000'));
});

test('PACKAGED over MAX_VM_CMD_PACKAGED_SIZE is a clear error', () => {
  // Only lengths are read before the check, so views stand in for 4 GiB.
  const half = { length: 2 ** 31 } as Buffer;
  assert.is(encodePackaged([half, { length: 2 ** 31 - 1 } as Buffer])[0].readUInt32BE(5), MAX_PACKAGED_SIZE);
  try {
    encodePackaged([half, half]);
    assert.unreachable('accepted 4 GiB');
  } catch (err) {
    assert.instance(err, PostcopyEncodeError);
    assert.match((err as Error).message, /packaged device state of 4294967296 bytes exceeds QEMU's MAX_VM_CMD_PACKAGED_SIZE \(4294967295 bytes\)/);
  }
});

test('unsentRanges: merged byte ranges of clear bits', () => {
  const bm = new Uint8Array(4);
  assert.equal(unsentRanges(bm, 32, 4096), [{ start: 0, length: 32 * 4096 }]);
  bm.fill(0xff);
  assert.equal(unsentRanges(bm, 32, 4096), []);
  bm.fill(0);
  bm[0] = 0b0000_0101; // pages 0 and 2 sent
  bm[2] = 0xff; // pages 16..23 sent
  assert.equal(unsentRanges(bm, 30, 4096), [
    { start: 1 * 4096, length: 4096 },
    { start: 3 * 4096, length: 13 * 4096 },
    { start: 24 * 4096, length: 6 * 4096 },
  ]);
  // Pages beyond pageCount are ignored even when clear.
  assert.equal(unsentRanges(new Uint8Array([0xff, 0x01]), 9, 4096), []);
  assert.throws(() => unsentRanges(new Uint8Array(1), 9, 4096), /too short/);
  // Brute-force against a per-page scan.
  for (let seed = 1; seed < 200; seed++) {
    const n = 1 + (seed * 7) % 70;
    const b = new Uint8Array(Math.ceil(n / 8) + 1);
    let x = seed;
    for (let i = 0; i < b.length; i++) { x = (x * 1103515245 + 12345) >>> 0; b[i] = (x >>> 16) & (seed % 3 === 0 ? 0xff : seed % 3 === 1 ? 0x0f : 0xf0); }
    const expect: { start: number; length: number }[] = [];
    for (let i = 0; i < n; i++) {
      if ((b[i >> 3] >> (i & 7)) & 1) continue;
      const last = expect[expect.length - 1];
      if (last && last.start + last.length === i) last.length++;
      else expect.push({ start: i, length: 1 });
    }
    assert.equal(unsentRanges(b, n, 1), expect, `seed ${seed}`);
  }
});

test.run();
