// Exercises the e2e library against the real qemu-system-x86_64.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  compareFiles,
  compareRange,
  createQcow2,
  diffRanges,
  fakeDestCommand,
  findTrailer,
  loadvmTiming,
  makePattern,
  MigrationError,
  patternBytes,
  peekStream,
  QemuProcessError,
  QmpCommandError,
  requireQemu,
  savevmTiming,
  shellQuote,
  sleep,
  startVm,
  Vm,
} from './lib';

const MiB = 1 << 20;
const PATTERN_ADDR = 0x1000000;

// Fail loudly rather than skip when QEMU is missing.
const qemuVersion = requireQemu();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-harness-'));
const vms: Vm[] = [];

async function vm(opts: Parameters<typeof startVm>[0]): Promise<Vm> {
  const v = await startVm(opts);
  vms.push(v);
  return v;
}

test.after.each(async () => {
  for (const v of vms.splice(0)) await v.stop();
});

test.after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

test('QEMU is present', () => {
  assert.match(qemuVersion, /QEMU emulator version \d+\.\d+/);
});

test('pattern files are deterministic, seed-dependent and fast to compare', () => {
  const a = path.join(dir, 'pa');
  const b = path.join(dir, 'pb');
  const c = path.join(dir, 'pc');
  makePattern(a, 5 * MiB + 123, 42);
  makePattern(b, 5 * MiB + 123, 42);
  makePattern(c, 5 * MiB + 123, 43);
  assert.is(fs.statSync(a).size, 5 * MiB + 123);
  assert.is(compareFiles(a, b), -1);
  assert.is.not(compareFiles(a, c), -1);
  assert.is(compareRange(a, 0, patternBytes(5 * MiB + 123, 42)), -1);
  // A prefix of a longer pattern is the shorter pattern.
  assert.is(compareRange(a, 0, patternBytes(1000, 42)), -1);

  const buf = fs.readFileSync(a);
  buf[4 * MiB + 7] ^= 1;
  buf[4 * MiB + 9] ^= 1;
  fs.writeFileSync(b, buf);
  assert.is(compareFiles(a, b), 4 * MiB + 7);
  assert.equal(diffRanges(a, b), [[4 * MiB + 7, 4 * MiB + 10]]);
  fs.writeFileSync(b, buf.subarray(0, 3 * MiB));
  assert.is(compareFiles(a, b), 3 * MiB);
  assert.is(compareFiles(b, a), 3 * MiB);
});

test('start, QMP commands, errors and events, stop cleans up', async () => {
  const v = await vm({ machine: 'pc', memMiB: 128 });
  const st = await v.queryStatus();
  assert.is(st.status, 'prelaunch');
  assert.is(st.running, false);
  const err = await v.qmp.execute('no-such-command').then(
    () => null,
    (e: unknown) => e,
  );
  assert.instance(err, QmpCommandError);
  assert.is((err as QmpCommandError).errorClass, 'CommandNotFound');
  await v.cont();
  const ev = await v.qmp.waitEvent('RESUME', 5000);
  assert.is(ev.event, 'RESUME');
  assert.ok((await v.queryStatus()).running);
  await v.stop();
  assert.ok(v.hasExited);
  assert.not.ok(fs.existsSync(v.dir), 'temp dir removed');
  assert.throws(() => process.kill(v.pid, 0));
});

test('a start-up failure rejects with QEMU stderr in the message', async () => {
  try {
    await vm({ extraArgs: ['-no-such-option'] });
    assert.unreachable('QEMU should have refused to start');
  } catch (e) {
    assert.instance(e, QemuProcessError);
    assert.match((e as Error).message, /no-such-option/);
  }
});

test('q35: pattern loaded with -device loader reads back through pmemsave', async () => {
  const pat = path.join(dir, 'pat8');
  makePattern(pat, 8 * MiB, 7);
  const v = await vm({ machine: 'q35', memMiB: 128, loads: [{ file: pat, addr: PATTERN_ADDR }] });
  const dump = path.join(dir, 'dump8');
  await v.pmemsave(dump, 8 * MiB, PATTERN_ADDR);
  assert.is(compareFiles(pat, dump), -1);
  await v.pmemsave(dump, 4096, PATTERN_ADDR - 4096);
  assert.ok(fs.readFileSync(dump).equals(Buffer.alloc(4096)), 'RAM below the pattern is zero');
});

test('precopy to exec:cat, record counts match query-migrate, restore is byte-identical', async () => {
  const pat = path.join(dir, 'pat16');
  makePattern(pat, 16 * MiB, 1);
  const src = await vm({ machine: 'pc', memMiB: 256, loads: [{ file: pat, addr: PATTERN_ADDR }] });
  const stream = path.join(dir, 'precopy.stream');
  const info = await src.migrate(`exec:cat > ${shellQuote(stream)}`);
  assert.is(info.status, 'completed');
  assert.is((await src.queryStatus()).status, 'postmigrate');

  const peek = peekStream(fs.readFileSync(stream));
  assert.is(peek.version, 3);
  assert.match(peek.machine, /^pc-i440fx-\d/);
  // QEMU 10's machine types send SWITCHOVER_START (11) before the device state; nothing else.
  assert.equal(peek.commands.filter((c) => c.cmd !== 11), [], 'plain precopy sends no commands but SWITCHOVER_START');
  assert.equal(peek.blocks[0], { id: 'pc.ram', length: 256 * MiB });
  assert.is(peek.pages, info.ram!.normal);
  assert.is(peek.zeros, info.ram!.duplicate);
  assert.is((peek.pages + peek.zeros) * 4096, info.ram!.total, 'every page sent once');
  assert.ok(peek.pages >= (16 * MiB) / 4096, 'the random pattern went as data pages');
  const stat = fs.statSync(stream);
  assert.ok(findTrailer(fs.readFileSync(stream)) > peek.deviceStateOffset, 'stream ends with EOF + VMDESCRIPTION');

  const srcDump = path.join(dir, 'src.mem');
  await src.pmemsave(srcDump, 256 * MiB);
  const dst = await vm({ machine: 'pc', memMiB: 256, incoming: `exec:cat ${shellQuote(stream)}` });
  await dst.waitForMigrationStatus('completed', 30_000);
  assert.ok(dst.migrationStatusSeen.has('completed'));
  const dstDump = path.join(dir, 'dst.mem');
  await dst.pmemsave(dstDump, 256 * MiB);
  assert.is(compareFiles(srcDump, dstDump), -1);
  assert.ok(stat.size > 16 * MiB);
});

test('incoming defer + postcopy-ram capability accepts a precopy stream', async () => {
  const stream = path.join(dir, 'precopy.stream');
  const dst = await vm({ machine: 'pc', memMiB: 256, incoming: 'defer' });
  assert.is((await dst.queryStatus()).status, 'inmigrate');
  await dst.migrateIncoming(`exec:cat ${shellQuote(stream)}`, { 'postcopy-ram': true });
  await dst.waitForMigrationStatus('completed', 30_000);
  const dump = path.join(dir, 'defer.mem');
  await dst.pmemsave(dump, 16 * MiB, PATTERN_ADDR);
  assert.is(compareRange(dump, 0, patternBytes(16 * MiB, 1)), -1);
});

test('a running source migrates too; the counts still match the stream', async () => {
  const v = await vm({ machine: 'pc', memMiB: 128, paused: false });
  await sleep(300); // let SeaBIOS run and dirty memory
  const stream = path.join(dir, 'running.stream');
  const info = await v.migrate(`exec:cat > ${shellQuote(stream)}`);
  const peek = peekStream(fs.readFileSync(stream));
  assert.is(peek.pages, info.ram!.normal);
  assert.is(peek.zeros, info.ram!.duplicate);
});

test('a failing migration rejects with MigrationError', async () => {
  const v = await vm({ machine: 'pc', memMiB: 64 });
  try {
    await v.migrate('exec:exit 3', { timeoutMs: 10_000 });
    assert.unreachable('migration into a dead pipe cannot complete');
  } catch (e) {
    assert.instance(e, MigrationError);
    assert.is((e as MigrationError).status, 'failed');
  }
});

test('return-path source hangs on exec:cat; a fake destination answering PONG and SHUT completes it', async () => {
  const pat = path.join(dir, 'pat16');
  const src = await vm({ machine: 'pc', memMiB: 128, loads: [{ file: pat, addr: PATTERN_ADDR }] });
  const stuck = path.join(dir, 'rp.stream');
  await src.startMigration(`exec:cat > ${shellQuote(stuck)}`, { capabilities: { 'postcopy-ram': true } });
  try {
    await src.waitForMigrationStatus('completed', 1500);
    assert.unreachable('source should wait for SHUT');
  } catch (e) {
    assert.instance(e, MigrationError);
  }
  // 7.2 stays 'active' while it waits for SHUT; 10.0 names the same wait 'device'.
  assert.ok(['active', 'device'].includes(String((await src.queryMigrate()).status)), 'the source waits for SHUT');
  assert.is((await src.queryStatus()).status, 'finish-migrate');
  const bytes = fs.readFileSync(stuck);
  const peek = peekStream(bytes);
  assert.equal(
    peek.commands.filter((c) => c.cmd !== 11).map((c) => [c.cmd, c.payload.toString('hex')]),
    [
      [1, ''], // OPEN_RETURN_PATH
      [2, '00000001'], // PING 1
      [3, '00000000000010000000000000001000'], // POSTCOPY_ADVISE: page size summary, target page size
    ],
  );
  const eof = findTrailer(bytes);
  assert.ok(eof > 0, 'everything up to VMDESCRIPTION was sent');
  assert.is(bytes[eof - 5], 0x7e, 'EOF follows the last section footer');
  assert.ok(JSON.parse(bytes.toString('utf8', eof + 6)).devices, 'VMDESCRIPTION JSON is the last thing sent');
  await src.kill(); // migrate_cancel cannot unstick it

  const src2 = await vm({ machine: 'pc', memMiB: 128, loads: [{ file: pat, addr: PATTERN_ADDR }] });
  const out = path.join(dir, 'rp2.stream');
  const log = path.join(dir, 'rp2.log');
  const info = await src2.migrate(`exec:${fakeDestCommand(out, log)}`, { capabilities: { 'return-path': true }, timeoutMs: 15_000 });
  assert.is(info.status, 'completed');
  const events = fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.ok(events.some((e) => e.pong === 1), 'answered PING 1');
  assert.ok(events.some((e) => e.shut === 0), 'sent SHUT');
  const p2 = peekStream(fs.readFileSync(out));
  assert.is(p2.pages, info.ram!.normal);
  assert.equal(p2.commands.map((c) => c.cmd).filter((c) => c !== 11), [1, 2], 'return-path alone: no POSTCOPY_ADVISE');
});

test('savevm/loadvm helpers on a qcow2 drive', async () => {
  const pat = path.join(dir, 'pat8');
  const disk = path.join(dir, 'disk.qcow2');
  createQcow2(disk, '16M');
  const drive = ['-drive', `if=none,id=d0,file=${disk},format=qcow2`];
  const a = await vm({ machine: 'pc', memMiB: 128, loads: [{ file: pat, addr: PATTERN_ADDR }], extraArgs: drive });
  const saveMs = await savevmTiming(a, 'h1');
  assert.ok(saveMs > 0);
  await a.stop();
  const b = await vm({ machine: 'pc', memMiB: 128, extraArgs: drive });
  const loadMs = await loadvmTiming(b, 'h1');
  assert.ok(loadMs > 0);
  const dump = path.join(dir, 'loadvm.mem');
  await b.pmemsave(dump, 8 * MiB, PATTERN_ADDR);
  assert.is(compareRange(dump, 0, patternBytes(8 * MiB, 7)), -1);
  try {
    await loadvmTiming(b, 'missing');
    assert.unreachable('loadvm of a missing tag reports an error');
  } catch (e) {
    assert.instance(e, QemuProcessError);
  }
});

test.run();
