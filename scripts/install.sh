#!/usr/bin/env bash
# Lays the /opt/kata tree (same shape as Kata's static tarball) from a release build.
#   PREFIX (default /opt/kata), CARGO_TARGET_DIR (default ./target)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/kata}
target=${CARGO_TARGET_DIR:-$here/target}/release
kernel_dir=${KERNEL_DIR:-$here/build/kernel}
ver="$(cat "$here/guest/kernel-version")-amd64"

install -d "$PREFIX/bin" "$PREFIX/libexec" "$PREFIX/share/defaults/kata-containers" \
  "$PREFIX/share/kata-containers" "$PREFIX/share/bash-completion/completions"

for bin in kata-runtime containerd-shim-kata-v2; do
  install -m 0755 "$target/$bin" "$PREFIX/bin/$bin"
done

# Kata users' files name /opt/kata/bin/qemu-system-x86_64: point it at Debian's QEMU.
ln -sfn /usr/bin/qemu-system-x86_64 "$PREFIX/bin/qemu-system-x86_64"

defaults="$PREFIX/share/defaults/kata-containers"
for f in "$here"/config/configuration-*.toml; do
  install -m 0644 "$f" "$defaults/"
done
ln -sfn configuration-qemu.toml "$defaults/configuration.toml"

assets="$PREFIX/share/kata-containers"
if [ -f "$kernel_dir/vmlinux-$ver" ]; then
  install -p -m 0644 "$kernel_dir/vmlinux-$ver" "$assets/vmlinux-$ver"
  install -m 0644 "$kernel_dir/vmlinuz-$ver" "$assets/vmlinuz-$ver"
  install -m 0644 "$kernel_dir/config-$ver" "$assets/config-$ver"
  ln -sfn "vmlinux-$ver" "$assets/vmlinux.container"
  ln -sfn "vmlinuz-$ver" "$assets/vmlinuz.container"
fi

initrd="$here/build/kata-containers-initrd-$ver.img"
if [ -f "$initrd" ]; then
  install -m 0644 "$initrd" "$assets/kata-containers-initrd-$ver.img"
  ln -sfn "kata-containers-initrd-$ver.img" "$assets/kata-containers-initrd.img"
fi
if [ -x "$here/build/tools/bin/virtiofsd" ]; then
  install -m 0755 "$here/build/tools/bin/virtiofsd" "$PREFIX/libexec/virtiofsd"
fi

"$PREFIX/bin/kata-runtime" completion bash > "$PREFIX/share/bash-completion/completions/kata-runtime"
echo "installed into $PREFIX"
