// The snapshot layer on synthetic streams: the last send of a page wins on
// disk (data over data, zero over data), the data-page count is exact, the
// image loads back into the same pages, and failures leave no file.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { createChunkHasher } from '../../src/snapshot/chunk-hash';
import * as zlib from 'node:zlib';
import { Qcow2Image } from '../../src/image';
import { encodeDigestTable } from '../../src/snapshot/digests';
import { VMSTATE_HEADER_SIZE } from '../../src/snapshot/layout';
import { Readable, Writable } from 'streamx';
import { StreamBuilder, BLOCKS } from './synthetic-stream';
import { saveSnapshot } from '../../src/snapshot/save';
import { loadSnapshot } from '../../src/snapshot/load';
import { openSnapshot } from '../../src/snapshot/snapshot-image';
import { verifySnapshot } from '../../src/snapshot/verify';
import { MigrationFramer } from '../../src/migration/framer';
import type { MigrationRecord } from '../../src/migration/records';
import { pumpAsync } from '../../src/util/pump';
import { SnapshotWriter } from '../../src/snapshot/snapshot-writer';
import type { BlockWrite } from '../../src/blockio';

const PS = 4096;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-snapshot-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

async function rejects(p: Promise<unknown>, pattern?: RegExp): Promise<void> {
  try {
    await p;
  } catch (err) {
    if (pattern) assert.match((err as Error).message, pattern);
    return;
  }
  assert.unreachable('expected a rejection');
}

function page(fill: number): Buffer {
  return Buffer.alloc(PS, fill);
}

function nodeStream(buf: Buffer, chunk = 1000): NodeJS.ReadableStream {
  const parts: Buffer[] = [];
  for (let i = 0; i < buf.length; i += chunk) parts.push(buf.subarray(i, i + chunk));
  return require('node:stream').Readable.from(parts) as NodeJS.ReadableStream;
}

/** A stream where pc.ram pages 0..3 are sent, then page 1 again with new data, page 2 again as zero. */
function resendStream(): Buffer {
  const b = new StreamBuilder().header().configuration();
  b.sectionStart(2).memSize(BLOCKS).eos().footer(2);
  b.sectionPart(2).page(0, 'pc.ram', page(1)).page(PS, null, page(2)).page(2 * PS, null, page(3)).page(3 * PS, null, page(4)).eos().footer(2);
  b.sectionPart(2).page(PS, 'pc.ram', page(0x22)).zero(2 * PS, null).zero(5 * PS, null).page(0, '/rom@etc/acpi/tables', page(9)).eos().footer(2);
  b.sectionEnd(2).zero(PS, '/rom@etc/acpi/tables').eos().footer(2);
  b.device(3, 'timer', Buffer.from([1, 2, 3]));
  b.eof().vmdesc({ page_size: PS, devices: [{ name: 'timer', instance_id: 0, version: 1 }] });
  return b.build();
}

async function records(stream: Buffer): Promise<MigrationRecord[]> {
  const out: MigrationRecord[] = [];
  const sink = new Writable({ write(r: unknown, cb: (e: Error | null) => void) { out.push(r as MigrationRecord); cb(null); } });
  await pumpAsync(Readable.from([stream]), new MigrationFramer(), sink);
  return out;
}

test('the last send of a page wins on disk; the data-page count is exact', async () => {
  const image = path.join(dir, 'resend.qcow2');
  const r = await saveSnapshot(nodeStream(resendStream(), 777), image, { clusterSize: 64 << 10 });
  assert.is(r.dataPages, 4, 'pages 0, 1, 3 of pc.ram and page 0 of the ROM');
  assert.is(r.pageRecords, 6);
  assert.is(r.zeroRecords, 3);
  const out = execFileSync('qemu-img', ['check', image], { encoding: 'utf8' });
  assert.match(out, /No errors were found/);
  const snap = await openSnapshot(image);
  try {
    assert.ok((await snap.image.read(0, PS)).equals(page(1)));
    assert.ok((await snap.image.read(PS, PS)).equals(page(0x22)), 'a re-sent page holds the newest data');
    assert.ok((await snap.image.read(2 * PS, PS)).equals(page(0)), 'a page re-sent as zero reads back as zero');
    assert.ok((await snap.image.read(3 * PS, PS)).equals(page(4)));
    const rom = snap.blocks[1];
    assert.is(rom.offset, 1 << 20, 'second block at the next 1 MiB boundary');
    assert.ok((await snap.image.read(rom.offset, PS)).equals(page(9)));
    assert.is(snap.header.dataPages, 4);
  } finally {
    await snap.image.close();
  }
  const v = await verifySnapshot(image);
  assert.is(v.dataPages, 4);
});

/** 4 MiB of RAM: pages across 1 MiB boundaries, some re-sent as data or as zero; `want` is pc.ram's final content. */
function runsStream(ramMiB = 3): { stream: Buffer; want: Buffer; pages: number } {
  const big = [{ id: 'pc.ram', length: ramMiB << 20 }, { id: 'vga.vram', length: 1 << 20 }];
  const pages = (ramMiB << 20) / PS;
  const b = new StreamBuilder().header().configuration();
  b.sectionStart(2).memSize(big).eos().footer(2);
  const want = Buffer.alloc(ramMiB << 20);
  const fillOf = (p: number, pass: number) => ((p * 7 + pass * 13) % 250) + 1;
  // Pass 1: every page except every 5th, which is sent as zero.
  b.sectionPart(2);
  for (let p = 0; p < pages; p++) {
    const first = p === 0;
    if (p % 5 === 0) b.zero(p * PS, first ? 'pc.ram' : null);
    else {
      b.page(p * PS, first ? 'pc.ram' : null, page(fillOf(p, 1)));
      want.fill(fillOf(p, 1), p * PS, (p + 1) * PS);
    }
  }
  b.eos().footer(2);
  // Pass 2 (a live VM): some pages of the second MiB again with new data,
  // some as zero; the first and third MiB keep their in-order digests.
  b.sectionPart(2);
  for (let p = 259; p < 510; p += 97) {
    b.page(p * PS, p === 259 ? 'pc.ram' : null, page(fillOf(p, 2)));
    want.fill(fillOf(p, 2), p * PS, (p + 1) * PS);
    b.zero((p + 1) * PS, null);
    want.fill(0, (p + 1) * PS, (p + 2) * PS);
  }
  b.page(0, 'vga.vram', page(0x55)).eos().footer(2);
  b.sectionEnd(2).eos().footer(2);
  b.device(3, 'timer', Buffer.from([1, 2, 3]));
  b.eof();
  const stream = b.build();
  return { stream, want, pages };
}

test('page runs: pages across 1 MiB boundaries, re-sent as data and as zero, any chunking: right on disk and in the digests', async () => {
  const { stream, want, pages } = runsStream();
  for (const chunk of [5000, 1 << 20, stream.length]) {
    const image = path.join(dir, `runs-${chunk}.qcow2`);
    await saveSnapshot(nodeStream(stream, chunk), image, { force: true });
    const snap = await openSnapshot(image);
    try {
      assert.ok((await snap.image.read(0, want.length)).equals(want), `pc.ram content, chunks of ${chunk}`);
      assert.ok((await snap.image.read(snap.blocks[1].offset, PS)).equals(page(0x55)));
      const table = snap.digests?.chunks ?? [];
      const cs = snap.digests?.chunkSize ?? 0;
      assert.is(snap.digests?.algorithm, 'xxh64');
      assert.is(table.length, snap.image.virtualSize / cs);
      const h = await createChunkHasher('xxh64');
      for (let c = 0; c < table.length; c++) {
        assert.is(table[c], h.whole(await snap.image.read(c * cs, cs)), `chunk ${c} digest, chunks of ${chunk}`);
      }
    } finally {
      await snap.image.close();
    }
    const v = await verifySnapshot(image);
    let dataPages = 1;
    for (let p = 0; p < pages; p++) if (want[p * PS] !== 0) dataPages++;
    assert.is(v.dataPages, dataPages, `digests and data pages check out, chunks of ${chunk}`);
  }
});

test('input chunks handed back for reuse are really free: scribbling over them changes nothing', async () => {
  // Several times what the pipeline buffers (~14 MiB between the input and
  // the image), so chunks must come back while the stream still flows.
  const { stream, want } = runsStream(48);
  const size = 64 << 10;
  let recycled = 0;
  let next = 0;
  const input = new Readable({
    // A chunk per turn of the event loop, like a pipe: the writer gets to
    // work between chunks.
    read(cb: (err: Error | null) => void) {
      setImmediate(() => {
        if (next >= stream.length) this.push(null);
        else {
          const chunk = Buffer.allocUnsafeSlow(Math.min(size, stream.length - next));
          stream.copy(chunk, 0, next, next + chunk.length);
          next += chunk.length;
          this.push(chunk);
        }
        cb(null);
      });
    },
  });
  // What FdReader.recycle does, made loud: the memory is overwritten at once.
  (input as unknown as { recycle(b: Buffer): boolean }).recycle = (b: Buffer) => {
    b.fill(0xaa);
    recycled++;
    return true;
  };
  const image = path.join(dir, 'recycled.qcow2');
  await saveSnapshot(input as unknown as NodeJS.ReadableStream, image, { force: true });
  assert.ok(recycled > 10, `chunks were recycled (${recycled})`);
  const snap = await openSnapshot(image);
  try {
    assert.ok((await snap.image.read(0, want.length)).equals(want));
    assert.ok((await snap.image.read(snap.blocks[1].offset, PS)).equals(page(0x55)));
  } finally {
    await snap.image.close();
  }
  await verifySnapshot(image);
});

test('gathered runs (segments over the input) put the same bytes on disk as copied runs, and a sink that gives up mid-way hands the rest to the copying path', async () => {
  const { stream, want } = runsStream(6);
  const VM_STATE = 64 << 20;
  /** Runs the writer over the stream in 3000-byte chunks (pages straddle them); returns the disk it wrote. */
  const run = async (gather: 'off' | 'on' | 'gives-up'): Promise<{ disk: Buffer; gathered: number; pushed: number }> => {
    const disk = Buffer.alloc(VM_STATE);
    let gathered = 0;
    let pushed = 0;
    let calls = 0;
    const writer = new SnapshotWriter({
      prepareImage: async () => VM_STATE,
      gather:
        gather === 'off'
          ? undefined
          : (offset, length, buffers, segs, count) => {
              if (gather === 'gives-up' && ++calls === 3) return false;
              let at = offset;
              for (let i = 0; i < count; i++) {
                const [b, off, len] = [segs[i * 3], segs[i * 3 + 1], segs[i * 3 + 2]];
                at += buffers[b].copy(disk, at, off, off + len);
              }
              assert.is(at - offset, length);
              gathered++;
              return true;
            },
    });
    const sink = new Writable({
      write(w: unknown, cb: (e: Error | null) => void) {
        const bw = w as BlockWrite;
        if (bw.offset < VM_STATE) {
          pushed++;
          let at = bw.offset;
          for (const b of bw.buffers) at += b.copy(disk, at);
        }
        writer.writeDone(bw);
        cb(null);
      },
    });
    await pumpAsync(nodeStream(stream, 3000) as unknown as Readable, new MigrationFramer({ pageRuns: true }), writer, sink);
    return { disk, gathered, pushed };
  };
  const copied = await run('off');
  assert.ok(copied.disk.subarray(0, want.length).equals(want), 'copied runs');
  assert.is(copied.gathered, 0);
  const gathered = await run('on');
  assert.ok(gathered.gathered > 6, `${gathered.gathered} gathered runs`);
  assert.is(gathered.pushed, 0, 'no RAM pushed while the sink takes runs');
  assert.ok(gathered.disk.equals(copied.disk), 'gathered runs');
  const gaveUp = await run('gives-up');
  assert.is(gaveUp.gathered, 2, 'the sink took two runs');
  assert.ok(gaveUp.pushed > 0, 'the rest went the copying way');
  assert.ok(gaveUp.disk.equals(copied.disk), 'no run lost or doubled on the way');
});

test('an image with version 1 (CRC-32) digests still verifies and loads, and damage to it is still caught', async () => {
  const { stream, want } = runsStream();
  const image = path.join(dir, 'v1.qcow2');
  await saveSnapshot(nodeStream(stream, 1 << 20), image, { force: true });
  // Rewrite the extension as an older save wrote it: same layout, CRC-32 per chunk.
  const snap = await openSnapshot(image);
  const cs = snap.digests?.chunkSize ?? 0;
  const chunks = new Uint32Array(snap.image.virtualSize / cs);
  for (let c = 0; c < chunks.length; c++) chunks[c] = zlib.crc32(await snap.image.read(c * cs, cs));
  const at = VMSTATE_HEADER_SIZE + snap.header.stateLength;
  const stateCrc = snap.digests?.stateCrc ?? 0;
  await snap.image.close();
  const img = await Qcow2Image.open(image, { writable: true });
  await img.writeVmState(at, encodeDigestTable({ algorithm: 'crc32', chunkSize: cs, stateCrc, chunks }));
  await img.close();
  const again = await openSnapshot(image);
  assert.is(again.digests?.algorithm, 'crc32');
  await again.image.close();
  await verifySnapshot(image);
  const r = await loadSnapshot(image, { output: path.join(dir, 'v1.stream') });
  assert.ok(r.dataPagesSent > 0);
  // One flipped byte of RAM: both verify and load refuse.
  const damaged = await Qcow2Image.open(image, { writable: true });
  const p = want.findIndex((b) => b !== 0);
  const byte = await damaged.read(p, 1);
  await damaged.write(p, Buffer.from([byte[0] ^ 0xff]));
  await damaged.close();
  await rejects(verifySnapshot(image), /digest mismatch/);
  await rejects(loadSnapshot(image, { output: path.join(dir, 'v1-bad.stream') }), /digest mismatch/);
});

test('data unmapped by damaged metadata is caught before anything is written', async () => {
  const { stream } = runsStream();
  const image = path.join(dir, 'unmapped.qcow2');
  await saveSnapshot(nodeStream(stream, 1 << 20), image, { force: true });
  // What a cleared L2 entry looks like: the first MiB of RAM reads as zeros.
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'discard 0 1M', image]);
  const out = path.join(dir, 'unmapped.stream');
  await rejects(loadSnapshot(image, { output: out }), /chunk 0\): the image maps no data there/);
  assert.not.ok(fs.existsSync(out), 'no output at all');
  await rejects(verifySnapshot(image), /digest mismatch/);
  // Without verification the same image loads (the damage is only seen by the digests).
  await loadSnapshot(image, { output: out, verify: false });
});

test('load sends every page once, with the final content', async () => {
  const image = path.join(dir, 'roundtrip.qcow2');
  await saveSnapshot(nodeStream(resendStream()), image, {});
  const outFile = path.join(dir, 'roundtrip.stream');
  const r = await loadSnapshot(image, { output: outFile });
  assert.is(r.dataPagesSent, 4);
  assert.is(r.dataPagesSent + r.zeroPagesSent, (BLOCKS[0].length + BLOCKS[1].length) / PS);
  const recs = await records(fs.readFileSync(outFile));
  const pages = new Map<string, Buffer | null>();
  for (const rec of recs) {
    if (rec.type === 'ram-page' || rec.type === 'ram-zero') {
      const key = `${rec.block.id}@${rec.address}`;
      assert.not.ok(pages.has(key), `${key} sent once`);
      pages.set(key, rec.type === 'ram-page' ? rec.data : null);
    }
  }
  assert.ok(pages.get(`pc.ram@${PS}`)?.equals(page(0x22)));
  assert.is(pages.get(`pc.ram@${2 * PS}`), null);
  assert.ok(pages.get('/rom@etc/acpi/tables@0')?.equals(page(9)));
  assert.is(recs[recs.length - 1].type, 'vmdescription', 'device state, EOF and VMDESCRIPTION close the stream');
});

test('failures leave no file: truncated stream, existing image, bad stream', async () => {
  const sub = fs.mkdtempSync(path.join(dir, 'fail-'));
  const whole = resendStream();
  for (const cut of [10, 60, 200, whole.length - 20]) {
    await rejects(saveSnapshot(nodeStream(whole.subarray(0, cut)), path.join(sub, 'x.qcow2')));
    assert.equal(fs.readdirSync(sub), [], `nothing left after a cut at ${cut}`);
  }
  const bad = Buffer.from(whole);
  bad[0] = 0;
  await rejects(saveSnapshot(nodeStream(bad), path.join(sub, 'x.qcow2')));
  assert.equal(fs.readdirSync(sub), []);
  fs.writeFileSync(path.join(sub, 'x.qcow2'), 'precious');
  await rejects(saveSnapshot(nodeStream(whole), path.join(sub, 'x.qcow2')), /already exists/);
  assert.is(fs.readFileSync(path.join(sub, 'x.qcow2'), 'utf8'), 'precious');
  assert.equal(fs.readdirSync(sub), ['x.qcow2']);
  const ac = new AbortController();
  const slow = new (require('node:stream').PassThrough)() as NodeJS.ReadWriteStream;
  slow.write(whole.subarray(0, 300));
  const p = saveSnapshot(slow, path.join(sub, 'y.qcow2'), { signal: ac.signal });
  setTimeout(() => ac.abort('SIGTERM'), 50);
  await rejects(p, /interrupted/);
  assert.equal(fs.readdirSync(sub), ['x.qcow2'], 'an interrupted save leaves nothing');
});

test('a damaged data cluster is caught by load and verify', async () => {
  const image = path.join(dir, 'damaged.qcow2');
  await saveSnapshot(nodeStream(resendStream()), image, { clusterSize: 64 << 10 });
  const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', image], { encoding: 'utf8' })) as Array<{ start: number; data: boolean; offset?: number }>;
  const first = map.find((e) => e.data && e.offset !== undefined);
  assert.ok(first);
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.from([0xee]), 0, 1, (first.offset as number) + 100);
  fs.closeSync(fd);
  await rejects(verifySnapshot(image), /digest mismatch in block pc.ram/);
  await rejects(loadSnapshot(image, { output: path.join(dir, 'damaged.stream') }), /digest mismatch/);
  const unchecked = await loadSnapshot(image, { output: path.join(dir, 'damaged.stream'), verify: false });
  assert.is(unchecked.dataPagesSent, 4);
});

test.run();
