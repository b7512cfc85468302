// Growing a pipe's buffer (F_SETPIPE_SZ).
//
// A Linux pipe holds 64 KiB by default. Moving 1 GiB through it costs 16k
// round trips in which one side sleeps and the other wakes it, and on a
// virtual machine a wake-up across CPUs is expensive: on our 2-vCPU bench
// machine reading 1 GiB from `cat` took 0.76-1.0 s through a 64 KiB pipe and
// 0.31-0.44 s through a 1 MiB one. Node has no fcntl(2): the native module
// has, and without it any process holding the pipe can resize it, so a
// one-line perl (perl-base is Essential in Debian; ~10 ms to spawn) does it
// on an inherited descriptor. Best effort: without either, or over the
// system's pipe-max-size, the pipe keeps its size.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { native } from './native';

const F_SETPIPE_SZ = 1031;
export const DEFAULT_PIPE_BYTES = 1 << 20;

/** The largest size an unprivileged process may set (/proc/sys/fs/pipe-max-size). */
function pipeMaxSize(): number {
  try {
    const n = Number(fs.readFileSync('/proc/sys/fs/pipe-max-size', 'utf8').trim());
    return Number.isSafeInteger(n) && n > 0 ? n : DEFAULT_PIPE_BYTES;
  } catch {
    return DEFAULT_PIPE_BYTES;
  }
}

/**
 * Asks for a pipe buffer of `bytes` on `fd` (0 or 1 of this process, a pipe).
 * Returns the size the kernel granted, or null when it could not be changed.
 * QEMU_SNAP_PIPE_SIZE overrides the size; 0 leaves pipes alone.
 */
export function enlargePipe(fd: 0 | 1, bytes = DEFAULT_PIPE_BYTES): number | null {
  if (process.platform !== 'linux') return null;
  const env = process.env.QEMU_SNAP_PIPE_SIZE;
  if (env !== undefined) {
    const n = Number(env);
    if (!Number.isSafeInteger(n) || n <= 0) return null;
    bytes = n;
  }
  const want = Math.min(bytes, pipeMaxSize());
  const mod = native();
  if (mod) {
    try {
      return mod.pipeSize(fd, want);
    } catch {
      return null;
    }
  }
  const handle = fd === 0 ? 'STDIN' : 'STDOUT';
  // The child gets our descriptor as its own fd 0 or 1 and prints the new size.
  const script = `my $n = fcntl(${handle}, ${F_SETPIPE_SZ}, ${want}); print STDERR (defined $n ? $n + 0 : -1);`;
  const stdio: ('ignore' | 'pipe' | number)[] = fd === 0 ? [0, 'ignore', 'pipe'] : ['ignore', 1, 'pipe'];
  try {
    const r = spawnSync('perl', ['-e', script], { stdio, timeout: 2000, encoding: 'utf8' });
    const n = Number(String(r.stderr).trim());
    return r.status === 0 && Number.isSafeInteger(n) && n > 0 ? n : null;
  } catch {
    return null;
  }
}
