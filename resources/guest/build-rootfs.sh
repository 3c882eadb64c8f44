#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Build (once, cached) the ext4 root filesystem image the Linux smoke tests boot from over
# virtio-blk. Made without root privileges or loop mounts: `mkfs.ext4 -d DIR`.
#
#   resources/guest/build-rootfs.sh              build if needed; the image path is the LAST stdout line
#   resources/guest/build-rootfs.sh --print-path print the image path only (no build)
#
# The image holds /init (the same tiny static program as the initramfs: it prints
# `SKIFF-INIT: userspace reached` and powers off) and empty /dev, /proc, /sys, /tmp.
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/skiff/rootfs-<hash>/rootfs.ext4 (64 MiB, sparse).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INIT_SRC="$HERE/init.c"
HASH="$(cat "$INIT_SRC" "$HERE/build-rootfs.sh" | sha256sum | cut -c1-12)"
OUT="${XDG_CACHE_HOME:-$HOME/.cache}/skiff/rootfs-$HASH"
IMG="$OUT/rootfs.ext4"

log() { printf '[build-rootfs] %s\n' "$*" >&2; }
die() { printf '[build-rootfs] ERROR: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
"") ;;
--print-path)
	printf '%s\n' "$IMG"
	exit 0
	;;
*) die "unknown argument $1" ;;
esac

if [[ -f "$OUT/.done" ]]; then
	printf '%s\n' "$IMG"
	exit 0
fi
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found: apt-get install e2fsprogs"
command -v gcc >/dev/null || die "gcc not found: apt-get install gcc"

mkdir -p "$OUT"
STAGE="$(mktemp -d "$OUT/stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/root/dev" "$STAGE/root/proc" "$STAGE/root/sys" "$STAGE/root/tmp"
log "compiling /init"
gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-asynchronous-unwind-tables \
	-fno-pie -no-pie -mgeneral-regs-only -Wall -Wl,--build-id=none -s -o "$STAGE/root/init" "$INIT_SRC"
chmod 0755 "$STAGE/root/init"
log "making a 64 MiB ext4 image"
rm -f "$IMG.tmp"
mkfs.ext4 -q -F -L skiff-root -d "$STAGE/root" "$IMG.tmp" 64M >&2
mv "$IMG.tmp" "$IMG"
touch "$OUT/.done"
printf '%s\n' "$IMG"
