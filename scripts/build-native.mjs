#!/usr/bin/env node
// Builds the optional native module (native/qemu_snap_native.c) with
// node-gyp, npm's own copy. qemu-snap works without it, only slower, so a
// failed build is a warning, not a failed install; set
// QEMU_SNAP_REQUIRE_NATIVE=1 (CI does) to make it fatal.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const required = process.env.QEMU_SNAP_REQUIRE_NATIVE === '1';

function candidates() {
  const out = [];
  // npm runs install scripts with npm_execpath set to its own CLI.
  if (process.env.npm_execpath) out.push(join(dirname(process.env.npm_execpath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  out.push(join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  return out;
}

const gyp = candidates().find((p) => existsSync(p));
let why = null;
if (process.platform !== 'linux') why = 'not Linux';
else if (!gyp) why = 'node-gyp not found beside npm';
else {
  // Build against the headers of the Node that runs us when they are
  // installed (Debian's nodejs has them): node-gyp would otherwise download
  // them from nodejs.org.
  const args = [gyp, 'rebuild'];
  const prefix = join(dirname(process.execPath), '..');
  if (!process.env.npm_config_nodedir && existsSync(join(prefix, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${prefix}`);
  const r = spawnSync(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
  if (r.status !== 0) why = `node-gyp rebuild failed:\n${r.stdout}${r.stderr}`;
}
if (why === null) {
  console.log('qemu-snap: native module built (build/Release/qemu_snap_native.node)');
} else if (required) {
  console.error(`qemu-snap: native module not built: ${why}`);
  process.exit(1);
} else {
  console.warn(`qemu-snap: native module not built (${why.split('\n')[0]}); using the slower pure-JS paths`);
}
