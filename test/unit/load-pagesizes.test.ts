// Per-block page sizes in MEM_SIZE (a postcopy-ram source with hugepage
// RAM): a precopy load must leave them out, since a destination reads them
// only after POSTCOPY_ADVISE; --host-page-size values are checked.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { StreamBuilder, frame } from './synthetic-stream';
import { saveSnapshot } from '../../src/snapshot/save';
import { loadSnapshot } from '../../src/snapshot/load';

const PS = 4096;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-pagesizes-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

const BLOCKS = [
  { id: 'pc.ram', length: 4 << 20, extras: [2 << 20] },
  { id: 'pc.bios', length: 64 << 10 },
];

function stream(): Buffer {
  const b = new StreamBuilder().header().configuration().sectionStart(2).memSize(BLOCKS).eos().footer(2);
  b.sectionPart(2).page(0, 'pc.ram', Buffer.alloc(PS, 1)).page(3 << 20, null, Buffer.alloc(PS, 2)).page(0, 'pc.bios', Buffer.alloc(PS, 3)).eos().footer(2);
  b.sectionEnd(2).eos().footer(2).device(3, 'timer', Buffer.from([1, 2])).eof();
  return b.build();
}

async function saved(): Promise<string> {
  const image = path.join(dir, 'ps.qcow2');
  if (!fs.existsSync(image)) await saveSnapshot(require('node:stream').Readable.from([stream()]), image);
  return image;
}

test('a precopy load drops the page sizes from MEM_SIZE, keeping the blocks and pages', async () => {
  const image = await saved();
  const out = path.join(dir, 'out.stream');
  await loadSnapshot(image, { output: out });
  const records = await frame(fs.readFileSync(out));
  const mem = records.find((r) => r.type === 'ram-mem-size');
  assert.ok(mem && mem.type === 'ram-mem-size');
  assert.equal(mem.blocks.map((b) => [b.id, b.length, b.pageSize]), [['pc.ram', 4 << 20, undefined], ['pc.bios', 64 << 10, undefined]]);
  const pages = records.filter((r) => r.type === 'ram-page').map((r) => (r.type === 'ram-page' ? `${r.block.id}@${r.address.toString(16)}=${r.data[0]}` : ''));
  assert.equal(pages, ['pc.ram@0=1', 'pc.ram@300000=2', 'pc.bios@0=3']);
});

test('--host-page-size values are checked against the image', async () => {
  const image = await saved();
  const out = path.join(dir, 'out2.stream');
  for (const [sizes, re] of [
    [[{ size: 1000 }], /host page size 1000 must be a power of two of at least the image's 4096-byte pages/],
    [[{ block: 'nope', size: 2 << 20 }], /the image has no RAM block "nope" \(it has pc.ram, pc.bios\)/],
  ] as const) {
    try {
      await loadSnapshot(image, { output: out, hostPageSizes: [...sizes] });
      assert.unreachable();
    } catch (err) {
      assert.match((err as Error).message, re);
    }
  }
});

test.run();
