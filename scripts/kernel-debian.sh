#!/usr/bin/env bash
# Fetches Debian's generic guest kernel (never installed on the host), extracts the ELF vmlinux
# from its XZ-compressed vmlinuz (PVH boot skips ~3.5 s of decompression under TCG) and runs
# depmod over its modules. Output: $OUT/{vmlinux,vmlinuz,config}-<ver> and $OUT/modules/.
# The kernel ABI version is pinned in guest/kernel/debian-version.
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$here/build/kernel-debian}
abi=$(cat "$here/guest/kernel/debian-version")
pkg="linux-image-${abi}-amd64"
ver="${abi}-amd64"

if [ -f "$OUT/vmlinux-$ver" ] && [ -f "$OUT/modules/lib/modules/$ver/modules.dep" ]; then
  echo "guest kernel $ver already in $OUT"
  exit 0
fi
mkdir -p "$OUT"
cd "$OUT"
if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
  if ! apt-get download "$pkg" 2>/dev/null; then
    apt-get update -qq
    apt-get download "$pkg" || {
      echo "error: Debian package $pkg is not available from the configured mirrors." >&2
      echo "hint: see 'apt-cache search linux-image-6.1' and update guest/kernel/debian-version." >&2
      exit 1
    }
  fi
fi
rm -rf unpack modules
dpkg-deb -x "${pkg}"_*.deb unpack
cp "unpack/boot/vmlinuz-$ver" "vmlinuz-$ver"
cp "unpack/boot/config-$ver" "config-$ver"

# Extract vmlinux: the first XZ stream inside the bzImage is the compressed kernel.
offset=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "vmlinuz-$ver" | head -n1 | cut -d: -f1)
[ -n "$offset" ] || { echo "error: no XZ stream in vmlinuz-$ver" >&2; exit 1; }
tail -c +"$((offset + 1))" "vmlinuz-$ver" | xz -dc --single-stream > "vmlinux-$ver.tmp" 2>/dev/null || true
head -c 4 "vmlinux-$ver.tmp" | grep -q $'\x7fELF' || { echo "error: extracted vmlinux is not an ELF file" >&2; exit 1; }
# QEMU keeps the loadable bytes of the kernel file mapped (as a ROM for resets): stop it from
# reading the ~23 MB of zeros (.bss, scratch) the last segment ends with.
(cd "$here" && cargo build --release -q -p kata-guest-image)
"$here/target/release/kata-guest-image" --trim-kernel "vmlinux-$ver.tmp"
mv "vmlinux-$ver.tmp" "vmlinux-$ver"

mkdir -p modules/lib
mv unpack/lib/modules modules/lib/
depmod -b "$OUT/modules" "$ver"
rm -rf unpack
echo "guest kernel $ver: $(du -h "vmlinux-$ver" | cut -f1) vmlinux in $OUT"
