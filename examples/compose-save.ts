// Save composed from the stages, as the README shows: bytes → records →
// block writes → image. Usage: node dist/examples/compose-save.js STREAM IMAGE
// (STREAM a raw migration stream file, or - for stdin).
//
// In your own code, import from 'qemu-snap' instead of '../src'.
import * as fs from 'node:fs';
import { MigrationFramer, SnapshotWriter, OrderedBlockWriter, Qcow2Image, ImageBlockTarget, finishSnapshotImage, pumpAsync } from '../src';

async function composeSave(input: NodeJS.ReadableStream, imagePath: string): Promise<void> {
  // Routes RAM to the virtual disk and the device state to QCOW2's VM state area.
  const target = new ImageBlockTarget();
  const writer = new SnapshotWriter({
    // Called once the stream's RAM block list is known: it sizes the disk.
    prepareImage: async (virtualSize) => {
      target.image = await Qcow2Image.create(imagePath, { virtualSize });
      return target.image.vmStateOffset;
    },
  });
  const ring = new OrderedBlockWriter(target, { onComplete: (w) => writer.writeDone(w) });
  await pumpAsync(input, new MigrationFramer({ pageRuns: true }), writer, ring);
  const image = target.image;
  if (!image) throw new Error('the stream ended before its RAM block list');
  // The STVM header (and digests, with a ChunkTracker on target.tracker), then flush and fsync.
  await finishSnapshotImage(image, writer.summary());
  await image.close();
}

async function main(): Promise<void> {
  const [streamFile, imagePath] = process.argv.slice(2);
  if (!streamFile || !imagePath) throw new Error('usage: compose-save STREAM|- IMAGE');
  const input = streamFile === '-' ? process.stdin : fs.createReadStream(streamFile);
  await composeSave(input, imagePath);
  console.error(`compose-save: wrote ${imagePath}`);
}

main().catch((err: Error) => {
  console.error(`compose-save: ${err.message}`);
  process.exit(1);
});
