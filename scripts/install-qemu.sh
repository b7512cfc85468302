#!/usr/bin/env bash
# Installs what qemu-snap's demo and tests drive: Debian 12's QEMU 7.2
# (qemu-system-x86, qemu-utils) with apt-get, and with --qemu10 also QEMU 10.0
# from Debian's bookworm-backports suite, unpacked side by side into a prefix
# (it never replaces 7.2). Works as root or, through sudo, as a normal user.
#
#   bash scripts/install-qemu.sh            # QEMU 7.2 only
#   bash scripts/install-qemu.sh --qemu10   # and QEMU 10.0 in $QEMU10_PREFIX
#   bash scripts/install-qemu.sh --guest    # and a Linux kernel for the e2e guest
#
# --guest takes Debian's cloud kernel package (linux-image-cloud-amd64) and
# keeps only its vmlinuz, in /opt/qemu-snap-guest (root) or
# ~/.local/qemu-snap-guest: the e2e tests boot it under TCG with an
# initramfs they build from test/e2e/guest/init.c (static, so libc.a too).
#
# QEMU 10.0 is run through two wrappers, <prefix>/bin/qemu-system-x86_64 and
# <prefix>/bin/qemu-img, which set LD_LIBRARY_PATH and the firmware paths (-L);
# the tests take them from QEMU_SNAP_QEMU and QEMU_SNAP_QEMU_IMG.
set -euo pipefail

want10=0
wantGuest=0
for a in "$@"; do
  case "$a" in
    --qemu10) want10=1 ;;
    --guest) wantGuest=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install-qemu.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" = 0 ]; then SUDO=(); else
  command -v sudo >/dev/null 2>&1 || { echo "install-qemu.sh: not root and no sudo: run it as root" >&2; exit 1; }
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() { [ $updated = 1 ] || { "${SUDO[@]}" apt-get update -q >/dev/null; updated=1; }; }

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
# A C compiler and make for the optional native module (node-gyp needs python3 too).
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ $wantGuest = 0 ] || [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-qemu.sh: installing ${need[*]}"
  apt_update
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
echo "install-qemu.sh: $(qemu-system-x86_64 --version | head -1)"

if [ "$(id -u)" = 0 ]; then guestDir=/opt/qemu-snap-guest; else guestDir=$HOME/.local/qemu-snap-guest; fi
if [ $wantGuest = 1 ] && [ ! -s "$guestDir/vmlinuz" ]; then
  apt_update
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { echo "install-qemu.sh: no linux-image-cloud-amd64 package found" >&2; exit 1; }
  kwork=$(mktemp -d)
  chmod 755 "$kwork"
  ( cd "$kwork" && apt-get download -q "$pkg" >/dev/null 2>&1 ) || { echo "install-qemu.sh: apt-get download $pkg failed" >&2; rm -rf "$kwork"; exit 1; }
  ( cd "$kwork" && dpkg-deb --fsys-tarfile ./*.deb | tar -x --wildcards './boot/vmlinuz-*' )
  "${SUDO[@]}" mkdir -p "$guestDir"
  "${SUDO[@]}" cp "$kwork"/boot/vmlinuz-* "$guestDir/vmlinuz"
  rm -rf "$kwork"
fi
[ $wantGuest = 0 ] || echo "install-qemu.sh: guest kernel $guestDir/vmlinuz"

[ $want10 = 1 ] || exit 0

if [ "$(id -u)" = 0 ]; then prefix=${QEMU10_PREFIX:-/opt/qemu-10.0}; else prefix=${QEMU10_PREFIX:-$HOME/.local/qemu-10.0}; fi
if [ -x "$prefix/bin/qemu-system-x86_64" ] && "$prefix/bin/qemu-system-x86_64" --version 2>/dev/null | grep -q 'version 10\.'; then
  echo "install-qemu.sh: $("$prefix/bin/qemu-system-x86_64" --version | head -1) in $prefix"
  exit 0
fi

# The backports suite, from the same mirror as the system's bookworm entry.
list=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # Either place may be missing (a deb822-only system has no sources.list):
  # grep's status for a missing file must not end the script under pipefail.
  mirror=$( { grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } | grep -v security | head -1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" | "${SUDO[@]}" tee "$list" >/dev/null
  updated=0
fi
apt_update

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
( cd "$work" && apt-get download -q qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
    qemu-system-data/bookworm-backports qemu-utils/bookworm-backports seabios/bookworm-backports >/dev/null 2>&1 ) \
  || { echo "install-qemu.sh: apt-get download from bookworm-backports failed" >&2; exit 1; }
# A prefix the user can create (~/.local/... when not root) is filled
# without sudo, so the files there are the user's own.
PSUDO=("${SUDO[@]}")
if mkdir -p "$prefix/bin" 2>/dev/null && [ -w "$prefix/bin" ]; then PSUDO=(); fi
"${PSUDO[@]}" mkdir -p "$prefix/bin"
for deb in "$work"/*.deb; do "${PSUDO[@]}" dpkg-deb -x "$deb" "$prefix"; done

wrap() { # wrap NAME EXTRA-ARGS
  printf '#!/bin/sh\n# QEMU 10.0 from bookworm-backports, beside the system QEMU (scripts/install-qemu.sh)\nLD_LIBRARY_PATH=%s/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s/usr/bin/%s %s "$@"\n' \
    "$prefix" "$prefix" "$1" "$2" | "${PSUDO[@]}" tee "$prefix/bin/$1" >/dev/null
  "${PSUDO[@]}" chmod 755 "$prefix/bin/$1"
}
wrap qemu-system-x86_64 "-L $prefix/usr/share/qemu -L $prefix/usr/share/seabios"
wrap qemu-img ""
echo "install-qemu.sh: $("$prefix/bin/qemu-system-x86_64" --version | head -1) in $prefix"
echo "install-qemu.sh: run the tests on it with QEMU_SNAP_QEMU=$prefix/bin/qemu-system-x86_64 QEMU_SNAP_QEMU_IMG=$prefix/bin/qemu-img"
