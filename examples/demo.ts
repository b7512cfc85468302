// `npm run demo`: save a small real VM with qemu-snap, describe the image,
// restore it into a new QEMU and check that guest RAM came back intact.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { startVm, makePattern, compareFiles, requireQemu, shellQuote } from '../test/e2e/lib';

const CLI = path.resolve(__dirname, '..', 'cli', 'qemu-snap.js');
const MEM_MIB = 256;

function snapCmd(args: string): string {
  return `${shellQuote(process.execPath)} ${shellQuote(CLI)} ${args}`;
}

async function main(): Promise<void> {
  requireQemu();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-demo-'));
  const pattern = path.join(dir, 'pattern.bin');
  const image = path.join(dir, 'vm.qcow2');
  makePattern(pattern, 64 << 20, 42);
  console.log(`demo: starting a paused ${MEM_MIB} MiB pc VM with 64 MiB of random data in RAM`);
  const src = await startVm({ machine: 'pc', memMiB: MEM_MIB, loads: [{ file: pattern, addr: 16 << 20 }], name: 'source' });
  let dst: Awaited<ReturnType<typeof startVm>> | null = null;
  try {
    let t = Date.now();
    const mig = await src.migrate(`exec:${snapCmd(`save -q ${shellQuote(image)}`)}`);
    console.log(`demo: migrate "exec:qemu-snap save vm.qcow2" completed in ${Date.now() - t} ms (QEMU sent ${mig.ram?.normal} data pages, ${mig.ram?.duplicate} zero pages)`);
    console.log('\n$ qemu-snap info vm.qcow2');
    process.stdout.write(execFileSync(process.execPath, [CLI, 'info', image], { encoding: 'utf8' }));
    console.log('\n$ qemu-img check vm.qcow2');
    process.stdout.write(execFileSync('qemu-img', ['check', image], { encoding: 'utf8' }));
    const srcDump = path.join(dir, 'src.mem');
    await src.pmemsave(srcDump, MEM_MIB << 20);

    t = Date.now();
    dst = await startVm({ machine: 'pc', memMiB: MEM_MIB, incoming: `exec:${snapCmd(`load -q ${shellQuote(image)}`)}`, name: 'destination' });
    await dst.waitForMigrationStatus('completed', 60_000);
    console.log(`\ndemo: -incoming "exec:qemu-snap load vm.qcow2" completed in ${Date.now() - t} ms (including QEMU start-up)`);
    const dstDump = path.join(dir, 'dst.mem');
    await dst.pmemsave(dstDump, MEM_MIB << 20);
    const diff = compareFiles(srcDump, dstDump);
    if (diff >= 0) throw new Error(`restored guest RAM differs from the source at byte ${diff}`);
    console.log(`demo: restored guest RAM is identical to the source's (${MEM_MIB} MiB compared)`);
  } finally {
    await src.stop().catch(() => undefined);
    await dst?.stop().catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: Error) => {
  console.error(`demo failed: ${err.message}`);
  process.exit(1);
});
