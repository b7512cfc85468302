// Concurrency around one image, with real QEMU: many destinations loading
// the same image at once, a save -f replacing an image while loads read it
// (each load must see the old image or the new one, whole), and saves
// racing for one name (one wins, the others fail cleanly, nothing is left).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startVm, makePattern, requireQemu, shellQuote, Vm } from './lib';
import { runCli, snapExec, tempDir, isOneLineError, memoryDifference } from './common';
import { captureStream, qemuImgCheck } from '../../bench/mutate';

const dir = tempDir('concurrency');
const streamA = path.join(dir, 'a.stream');
const streamB = path.join(dir, 'b.stream');
let loadA: Buffer;
let loadB: Buffer;

test.before(async () => {
  requireQemu();
  // Two different guests of the same machine: 64 MiB, 8 MiB of random data each.
  await captureStream(streamA, 64, 8, 101);
  await captureStream(streamB, 64, 8, 202);
  for (const [s, name] of [[streamA, 'a'], [streamB, 'b']] as const) {
    const img = path.join(dir, `${name}.qcow2`);
    const r = await runCli(['save', '-q', '--input', s, img]);
    assert.is(r.code, 0, r.stderr);
    const l = await runCli(['load', '-q', img]);
    assert.is(l.code, 0, l.stderr);
    if (name === 'a') loadA = l.stdout;
    else loadB = l.stdout;
  }
  assert.not.ok(loadA.equals(loadB));
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('8 destination QEMUs load one image at once: all come back identical to the source', async () => {
  const MEM = 128;
  const pattern = path.join(dir, 'pattern8.bin');
  makePattern(pattern, 16 << 20, 808);
  const image = path.join(dir, 'eight.qcow2');
  const srcDump = path.join(dir, 'eight.src.mem');
  const src = await startVm({ machine: 'pc', memMiB: MEM, paused: true, loads: [{ file: pattern, addr: 32 << 20 }], name: 'eight-src' });
  try {
    await src.migrate(snapExec(`save -q ${shellQuote(image)}`));
    await src.pmemsave(srcDump, MEM << 20);
  } finally {
    await src.stop();
  }
  const dsts: Vm[] = [];
  try {
    const started = await Promise.allSettled(
      Array.from({ length: 8 }, (_, i) => startVm({ machine: 'pc', memMiB: MEM, paused: true, incoming: snapExec(`load -q ${shellQuote(image)}`), name: `eight-dst${i}` })),
    );
    for (const s of started) if (s.status === 'fulfilled') dsts.push(s.value);
    for (const s of started) if (s.status === 'rejected') throw s.reason;
    await Promise.all(dsts.map(async (vm) => assert.is((await vm.waitForMigrationStatus('completed', 120_000)).status, 'completed')));
    for (let i = 0; i < dsts.length; i++) {
      const dump = path.join(dir, `eight.dst${i}.mem`);
      await dsts[i].pmemsave(dump, MEM << 20);
      assert.is(memoryDifference(srcDump, dump, false), null, `destination ${i} equals the source`);
      fs.unlinkSync(dump);
    }
  } finally {
    await Promise.all(dsts.map((vm) => vm.stop()));
  }
});

for (const tmpfile of ['1', '0']) {
  const mode = tmpfile === '1' ? 'unnamed temporary' : 'named temporary (QEMU_SNAP_TMPFILE=0)';

  test(`save -f replaces an image while loads read it: each load sees the old or the new image, whole [${mode}]`, async () => {
    const image = path.join(dir, `replace${tmpfile}.qcow2`);
    fs.copyFileSync(path.join(dir, 'a.qcow2'), image);
    const env = { QEMU_SNAP_TMPFILE: tmpfile };
    let sawOld = 0;
    let sawNew = 0;
    for (let round = 0; round < 4; round++) {
      // Alternate: A is replaced by B, then B by A.
      const [oldLoad, next, newLoad] = round % 2 === 0 ? [loadA, streamB, loadB] : [loadB, streamA, loadA];
      const save = runCli(['save', '-q', '-f', '--input', next, image], { env });
      // Loads started before, during and after the replacement.
      const loads: Promise<Awaited<ReturnType<typeof runCli>>>[] = [];
      for (let k = 0; k < 6; k++) {
        loads.push(runCli(['load', '-q', image]));
        await new Promise((r) => setTimeout(r, 40));
      }
      const s = await save;
      assert.is(s.code, 0, s.stderr);
      loads.push(runCli(['load', '-q', image]));
      for (const l of await Promise.all(loads)) {
        assert.is(l.code, 0, l.stderr);
        if (l.stdout.equals(oldLoad)) sawOld++;
        else if (l.stdout.equals(newLoad)) sawNew++;
        else assert.unreachable(`round ${round}: a load saw neither image (${l.stdout.length} bytes)`);
      }
      assert.equal(fs.readdirSync(dir).filter((n) => n.startsWith('.')), [], 'no temporary left');
    }
    process.stdout.write(`  [${mode}] loads during replacement: ${sawOld} saw the old image, ${sawNew} the new one\n`);
    assert.ok(sawNew >= 4, `the last load of each round sees the new image (${sawOld} old, ${sawNew} new)`);
    assert.is(qemuImgCheck(image), null);
  });

  test(`saves racing for one name: one wins, the others fail cleanly [${mode}]`, async () => {
    const env = { QEMU_SNAP_TMPFILE: tmpfile };
    for (let round = 0; round < 3; round++) {
      const sub = tempDir('race');
      try {
        const target = path.join(sub, 'vm.qcow2');
        const streams = [streamA, streamB, streamA];
        const runs = await Promise.all(streams.map((s) => runCli(['save', '-q', '--input', s, target], { env })));
        const winners = runs.filter((r) => r.code === 0);
        assert.is(winners.length, 1, `exits ${runs.map((r) => r.code).join('/')}: ${runs.map((r) => r.stderr).join(' ')}`);
        for (const r of runs) {
          if (r.code === 0) continue;
          assert.is(r.code, 1);
          assert.ok(isOneLineError(r.stderr), r.stderr);
          assert.match(r.stderr, /already exists/);
        }
        assert.equal(fs.readdirSync(sub), ['vm.qcow2'], 'only the image');
        const l = await runCli(['load', '-q', target]);
        assert.ok(l.stdout.equals(streams[runs.indexOf(winners[0])] === streamA ? loadA : loadB), "the image is the winner's, whole");
      } finally {
        fs.rmSync(sub, { recursive: true, force: true });
      }
    }
  });
}

test.run();
