#!/usr/bin/env bash
# Builds the static kata-agent and the guest initrd into build/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
ver="$(cat guest/kernel-version)-amd64"
triple=x86_64-unknown-linux-gnu
# Static glibc build; --target keeps build scripts and proc-macros dynamic.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p kata-agent --target "$triple"
cargo build --release -p kata-guest-image
mkdir -p build
agent="target/$triple/release/kata-agent"
strip -o build/kata-agent "$agent"
file build/kata-agent | grep -qE 'static(-pie)? linked|statically linked' || { echo "error: kata-agent is not statically linked" >&2; exit 1; }
busybox_args=()
[ -x /bin/busybox ] && busybox_args=(--busybox /bin/busybox)
target/release/kata-guest-image --agent build/kata-agent \
  --modules-dir "build/kernel/modules/lib/modules/$ver" "${busybox_args[@]}" \
  --output "build/kata-containers-initrd-$ver.img"
