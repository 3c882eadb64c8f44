#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Build (once, cached) the skiff smoke-test guest: a minimal Linux 6.1 kernel
# (vmlinux with a PVH entry note, and bzImage) plus a tiny initramfs.
#
#   resources/guest/build-kernel.sh              build if needed; the output dir is the LAST stdout line
#   resources/guest/build-kernel.sh --print-dir  print the output dir only (no build, may not exist yet)
#   resources/guest/build-kernel.sh --force      rebuild even if the cache stamp exists
#
# Output dir: $SKIFF_KERNEL_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/skiff/kernel-<hash>,
# <hash> covering linux.config, patches/, init.c and this script. It holds
#   vmlinux  bzImage  initramfs.cpio  config  System.map  .done
# Progress goes to stderr; stdout carries only the output dir.
#
# Environment:
#   SKIFF_KERNEL_DIR      output dir (overrides the hashed cache path)
#   SKIFF_LINUX_TARBALL   kernel source (default /usr/src/linux-source-6.1.tar.xz)
#   SKIFF_JOBS            make -j value (default: nproc)
#   SKIFF_INSTALL_DEPS=1  as root with apt-get: install missing build dependencies
#   SKIFF_KEEP_BUILD=1    keep the build tree after a successful build
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/linux.config"
PATCH_DIR="$HERE/patches"
INIT_SRC="$HERE/init.c"
TARBALL="${SKIFF_LINUX_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
APT_PACKAGES="linux-source-6.1 bc flex bison libelf-dev libssl-dev lz4 gcc make"

log() { printf '[build-kernel] %s\n' "$*" >&2; }
die() { printf '[build-kernel] ERROR: %s\n' "$*" >&2; exit 1; }

recipe_hash() {
	# Everything that decides the output, in a fixed order.
	local f
	{
		for f in "$FRAGMENT" "$INIT_SRC" "$HERE/build-kernel.sh" "$PATCH_DIR"/*.patch; do
			printf '%s\n' "${f##*/}"
			cat "$f"
		done
	} | sha256sum | cut -c1-12
}

if [[ -n "${SKIFF_KERNEL_DIR:-}" ]]; then
	OUT="$SKIFF_KERNEL_DIR"
else
	OUT="${XDG_CACHE_HOME:-$HOME/.cache}/skiff/kernel-$(recipe_hash)"
fi

FORCE=0
case "${1:-}" in
"") ;;
--print-dir)
	printf '%s\n' "$OUT"
	exit 0
	;;
--force) FORCE=1 ;;
-h | --help)
	sed -n '3,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*) die "unknown argument '$1' (try --help)" ;;
esac

if [[ $FORCE == 0 && -f "$OUT/.done" ]]; then
	printf '%s\n' "$OUT"
	exit 0
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# One builder at a time per output dir; a waiting one finds the stamp afterwards.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$OUT/.lock"
	if ! flock -n 9; then
		log "another build of $OUT is running; waiting for it"
		flock 9
	fi
	if [[ $FORCE == 0 && -f "$OUT/.done" ]]; then
		printf '%s\n' "$OUT"
		exit 0
	fi
fi

# ---- prerequisites ---------------------------------------------------------------
missing=()
for tool in tar xz make gcc ld flex bison bc lz4 sha256sum readelf patch awk; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ -f /usr/include/libelf.h || -f /usr/include/gelf.h ]] || missing+=("libelf headers (libelf-dev)")
[[ -f "$TARBALL" ]] || missing+=("$TARBALL")

if ((${#missing[@]})); then
	if [[ "${SKIFF_INSTALL_DEPS:-0}" == 1 && $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
		log "installing: $APT_PACKAGES"
		apt-get update >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y $APT_PACKAGES >&2
	else
		die "missing: ${missing[*]}
  install with: apt-get install $APT_PACKAGES
  (or run as root with SKIFF_INSTALL_DEPS=1)"
	fi
fi

# ---- source tree -------------------------------------------------------------------
BUILD="$OUT/build"
rm -rf "$BUILD"
mkdir -p "$BUILD"
log "output dir: $OUT"
log "extracting $TARBALL into $BUILD"
tar -xf "$TARBALL" -C "$BUILD" --strip-components=1
[[ -f "$BUILD/Makefile" ]] || die "no Makefile at the top of $TARBALL"
cd "$BUILD"
KVER="$(make -s kernelversion)"
[[ "$KVER" == 6.1.* ]] || die "expected a Linux 6.1 source tree, got $KVER"
log "kernel $KVER"

# ---- patches (each must apply, and leave its "skiff:" marker in every file it touches)
shopt -s nullglob
patches=("$PATCH_DIR"/*.patch)
((${#patches[@]})) || die "no patches in $PATCH_DIR"
for p in "${patches[@]}"; do
	log "applying ${p##*/}"
	patch -p1 --forward --batch --no-backup-if-mismatch <"$p" >&2 ||
		die "patch ${p##*/} did not apply to $KVER"
	while read -r f; do
		grep -q 'skiff: skipped' "$f" || die "patch ${p##*/}: marker missing in $f after applying"
	done < <(sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$p")
done
# The two changes HOST.md asks for (and a third one found here), checked by content as well:
grep -A1 -x $'\tif (0)' arch/x86/kernel/alternative.c | grep -x $'\t\tint3_selftest();' >/dev/null ||
	die "int3_selftest() is still called in arch/x86/kernel/alternative.c"
grep -q 'if (0 && unlikely(static_cpu_has_bug(X86_BUG_FXSAVE_LEAK)))' arch/x86/kernel/fpu/core.c ||
	die "the X86_BUG_FXSAVE_LEAK block in arch/x86/kernel/fpu/core.c is still active"
# Found by skiff's CI: fpu__drop() executes fwait (not emulated here) when a kernel thread exits.
! sed -n '/^void fpu__drop/,/^}/p' arch/x86/kernel/fpu/core.c | grep -q 'asm volatile("1: fwait' ||
	die "fpu__drop() in arch/x86/kernel/fpu/core.c still executes fwait"

# ---- config ----------------------------------------------------------------------------
log "configuring: allnoconfig + linux.config, then olddefconfig"
make -s ARCH=x86_64 KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >&2
make -s ARCH=x86_64 olddefconfig >&2
# Every CONFIG_X=v of the fragment must be in .config verbatim; every
# "# CONFIG_X is not set" must not be enabled.
bad="$(awk '
	FNR == NR {
		if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) { have[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1) }
		next
	}
	/^CONFIG_[A-Za-z0-9_]+=/ {
		i = index($0, "="); k = substr($0, 1, i - 1); v = substr($0, i + 1)
		if (!(k in have) || have[k] != v) printf "  %s: want %s, got %s\n", k, v, ((k in have) ? have[k] : "n")
		next
	}
	/^# CONFIG_[A-Za-z0-9_]+ is not set/ {
		k = $2
		if ((k in have) && have[k] != "n") printf "  %s: want n, got %s\n", k, have[k]
	}
' .config "$FRAGMENT")"
[[ -z "$bad" ]] || die "olddefconfig did not keep these options of linux.config (unmet dependencies?):
$bad"
log "config check passed ($(grep -c '=y$' .config) options =y)"

# ---- kernel ------------------------------------------------------------------------------
JOBS="${SKIFF_JOBS:-$(nproc)}"
log "make -j$JOBS vmlinux bzImage (several minutes)"
start=$SECONDS
make -j"$JOBS" ARCH=x86_64 vmlinux bzImage >&2
log "kernel built in $((SECONDS - start)) s"
# PVH entry: the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18 = 0x12).
readelf -nW vmlinux | grep -A1 -w Xen | grep -qi '0x00000012\|PHYS32_ENTRY' ||
	die "vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH on?"

# ---- initramfs ----------------------------------------------------------------------------
log "building initramfs"
gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-asynchronous-unwind-tables \
	-fno-pie -no-pie -mgeneral-regs-only -Wall -Wl,--build-id=none -s \
	-o "$BUILD/skiff-init" "$INIT_SRC"
# gen_init_cpio is the kernel's own newc writer; it makes device nodes without root.
[[ -x usr/gen_init_cpio ]] || gcc -O2 -o usr/gen_init_cpio usr/gen_init_cpio.c
cat >"$BUILD/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /root 0700 0 0
file /init $BUILD/skiff-init 0755 0 0
EOF
usr/gen_init_cpio -t 0 "$BUILD/initramfs.list" >"$BUILD/initramfs.cpio"

# ---- install ------------------------------------------------------------------------------
rm -f "$OUT/.done"
cp vmlinux "$OUT/vmlinux"
cp arch/x86/boot/bzImage "$OUT/bzImage"
cp .config "$OUT/config"
cp System.map "$OUT/System.map"
cp "$BUILD/initramfs.cpio" "$OUT/initramfs.cpio"
cd "$OUT"
if [[ "${SKIFF_KEEP_BUILD:-0}" != 1 ]]; then
	rm -rf "$BUILD"
fi
{
	echo "kernel=$KVER"
	echo "recipe=$(recipe_hash)"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$OUT/.done"
log "done: $(ls "$OUT" | tr '\n' ' ')"
printf '%s\n' "$OUT"
