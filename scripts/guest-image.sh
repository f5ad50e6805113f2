#!/usr/bin/env bash
# Builds the static kata-agent and the guest initrds and rootfs image into build/:
#   kata-containers-initrd-<release>.img for the project's kernel (build/kernel): no modules;
#   kata-containers-<release>.img, the same tree as an ext4 disk image with an NVDIMM/DAX header
#     (Kata's `image =`), for the project's kernel, which has NVDIMM, DAX and ext4 built in;
#   kata-containers-initrd-<abi>-amd64.img for Debian's kernel (build/kernel-debian), with the
#   modules the runtime needs, when that kernel has been fetched (KERNEL=debian or all).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
triple=x86_64-unknown-linux-gnu
# Static glibc build, not position-independent: a static-pie binary relocates itself at every
# start, which under TCG costs ~25 ms per exec of the agent (PID 1 and each container helper).
# --target keeps build scripts and proc-macros dynamic.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --release -p kata-agent --target "$triple"
cargo build --release -p kata-guest-image
mkdir -p build
agent="target/$triple/release/kata-agent"
strip -o build/kata-agent "$agent"
file build/kata-agent | grep -qE 'static(-pie)? linked|statically linked' || { echo "error: kata-agent is not statically linked" >&2; exit 1; }
busybox_args=()
[ -x /bin/busybox ] && busybox_args=(--busybox /bin/busybox)
# iptables tools for kata-runtime iptables (Debian's iptables package; scripts/install-deps.sh).
[ -x /usr/sbin/xtables-legacy-multi ] && busybox_args+=(--iptables /usr/sbin/xtables-legacy-multi)
built=0
if [ -f build/kernel/release ]; then
  release=$(cat build/kernel/release)
  target/release/kata-guest-image --agent build/kata-agent "${busybox_args[@]}" \
    --output "build/kata-containers-initrd-$release.img"
  target/release/kata-guest-image --agent build/kata-agent "${busybox_args[@]}" \
    --format image --output "build/kata-containers-$release.img"
  built=1
fi
debian="$(cat guest/kernel/debian-version)-amd64"
if [ -d "build/kernel-debian/modules/lib/modules/$debian" ]; then
  target/release/kata-guest-image --agent build/kata-agent \
    --modules-dir "build/kernel-debian/modules/lib/modules/$debian" "${busybox_args[@]}" \
    --output "build/kata-containers-initrd-$debian.img"
  built=1
fi
[ "$built" -eq 1 ] || { echo "error: no guest kernel in build/kernel or build/kernel-debian; run 'make kernel' first" >&2; exit 1; }
