#!/usr/bin/env bash
# Installs what building and testing skiff needs, once: Debian packages (when root), the
# x86_64-unknown-none Rust target (for the test guest), and the cached Linux smoke kernel.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(linux-source-6.1 bc flex bison libelf-dev libssl-dev lz4 cpio e2fsprogs iproute2 make gcc g++ xz-utils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    else
        echo "setup: missing packages: ${missing[*]}" >&2
        echo "setup: run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
    echo "setup: adding the x86_64-unknown-none Rust target" >&2
    rustup target add x86_64-unknown-none >&2
fi

if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "setup: warning: /dev/kvm is missing or not accessible; skiff cannot run VMs here" >&2
fi

echo "setup: smoke kernel and root filesystem (cached after the first build)" >&2
bash resources/guest/build-kernel.sh >/dev/null
bash resources/guest/build-rootfs.sh >/dev/null
