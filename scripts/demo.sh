#!/usr/bin/env bash
# Runs the demo; says what to install when QEMU is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
  echo "the demo needs QEMU: sudo apt-get install -y qemu-system-x86 qemu-utils" >&2
  exit 1
fi
node dist/examples/demo.js
