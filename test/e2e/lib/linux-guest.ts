// A Linux guest for the e2e tests: Debian's cloud kernel (installed by
// scripts/install-qemu.sh --guest) with an initramfs of one static program,
// test/e2e/guest/init.c, that dirties memory and counts on the serial port.
// It runs under TCG: a Linux kernel hangs at boot under the nested KVM here.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { QemuSnapError } from '../../../src/errors';
import { VmOptions } from './vm';
import { sleep } from './qmp';

const INIT_SOURCE = path.resolve(__dirname, '..', '..', '..', '..', 'test', 'e2e', 'guest', 'init.c');

/** The guest kernel or its init could not be had. */
export class GuestSetupError extends QemuSnapError {}

/** Where scripts/install-qemu.sh --guest puts the kernel, or QEMU_SNAP_GUEST_KERNEL. */
export function guestKernel(): string {
  const candidates = [process.env.QEMU_SNAP_GUEST_KERNEL, '/opt/qemu-snap-guest/vmlinuz', path.join(os.homedir(), '.local', 'qemu-snap-guest', 'vmlinuz')];
  const found = candidates.find((p): p is string => !!p && fs.existsSync(p));
  if (!found) throw new GuestSetupError('no Linux kernel for the guest tests: run `bash scripts/install-qemu.sh --guest` (or set QEMU_SNAP_GUEST_KERNEL)');
  return found;
}

/** One entry of a newc cpio archive. */
function cpioEntry(name: string, mode: number, data: Buffer, rdev: [number, number] = [0, 0], ino = 1): Buffer {
  const nameBuf = Buffer.from(name + '\0');
  const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, rdev[0], rdev[1], nameBuf.length, 0];
  const header = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'ascii');
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  return Buffer.concat([header, nameBuf, pad(header.length + nameBuf.length), data, pad(data.length)]);
}

let cachedInitramfs: string | undefined;

/**
 * Compiles init.c statically and wraps it with /dev/console (the kernel opens
 * it for init's stdio) into an uncompressed newc initramfs. Cached per
 * source in the temp directory.
 */
export function guestInitramfs(): string {
  if (cachedInitramfs && fs.existsSync(cachedInitramfs)) return cachedInitramfs;
  const source = fs.readFileSync(INIT_SOURCE);
  const tag = crypto.createHash('sha256').update(source).digest('hex').slice(0, 12);
  const out = path.join(os.tmpdir(), `qemu-snap-guest-${tag}.cpio`);
  if (!fs.existsSync(out)) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-guest-build-'));
    try {
      const bin = path.join(dir, 'init');
      const r = spawnSync('cc', ['-static', '-O2', '-o', bin, INIT_SOURCE], { encoding: 'utf8' });
      if (r.error || r.status !== 0) throw new GuestSetupError(`cannot build the guest's init (cc -static): ${r.error?.message ?? r.stderr.trim()}`);
      const archive = Buffer.concat([
        cpioEntry('dev', 0o040755, Buffer.alloc(0), [0, 0], 1),
        cpioEntry('dev/console', 0o020600, Buffer.alloc(0), [5, 1], 2),
        cpioEntry('init', 0o100755, fs.readFileSync(bin), [0, 0], 3),
        cpioEntry('TRAILER!!!', 0, Buffer.alloc(0), [0, 0], 0),
      ]);
      const tmp = `${out}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, archive);
      fs.renameSync(tmp, out);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  cachedInitramfs = out;
  return out;
}

export interface LinuxGuestOptions {
  /** The file the serial console is written to. */
  serialFile: string;
  /** MiB of memory the guest rewrites every tick (default 16). */
  dirtyMiB?: number;
  /** Pause between ticks in ms (default 100). */
  tickMs?: number;
  /** Bytes between two words written in the dirty buffer (default 4096). */
  stride?: number;
  /** Guest-physical ranges Linux must leave alone ([start, length]), e.g. for a static pattern loaded with -device loader. */
  reserve?: Array<[number, number]>;
}

/** VmOptions for a Linux guest (TCG, running); merge your own machine/memory/loads in. */
export function linuxGuestVm(g: LinuxGuestOptions, base: VmOptions = {}): VmOptions {
  const append = [
    'console=ttyS0', 'quiet', 'panic=-1', 'nokaslr', 'mitigations=off',
    ...(g.reserve ?? []).map(([start, len]) => `memmap=${len}$${start}`),
    `QS_DIRTY_MIB=${g.dirtyMiB ?? 16}`, `QS_TICK_MS=${g.tickMs ?? 100}`, `QS_STRIDE=${g.stride ?? 4096}`,
  ].join(' ');
  return {
    ...base,
    accel: 'tcg',
    paused: base.paused ?? false,
    extraArgs: [
      '-kernel', guestKernel(), '-initrd', guestInitramfs(), '-append', append,
      '-serial', `file:${g.serialFile}`,
      ...(base.extraArgs ?? []),
    ],
  };
}

/** The last tick the guest printed on its serial console, or 0 before the first. */
export function lastTick(serialFile: string): number {
  let text = '';
  try {
    text = fs.readFileSync(serialFile, 'latin1');
  } catch {
    return 0;
  }
  const all = [...text.matchAll(/qsnap-tick (\d+)/g)];
  return all.length ? Number(all[all.length - 1][1]) : 0;
}

/** Waits until the guest has printed tick `atLeast` or more; returns the tick seen. */
export async function waitForTick(serialFile: string, atLeast: number, timeoutMs = 60_000): Promise<number> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const t = lastTick(serialFile);
    if (t >= atLeast) return t;
    if (Date.now() > until) {
      let tail = '';
      try {
        tail = fs.readFileSync(serialFile, 'latin1').slice(-400).replace(/\s+/g, ' ');
      } catch {
        tail = '(no serial output)';
      }
      throw new GuestSetupError(`the Linux guest did not reach tick ${atLeast} within ${timeoutMs} ms (last ${t}); serial: ${tail}`);
    }
    await sleep(100);
  }
}
