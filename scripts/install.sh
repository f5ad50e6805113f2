#!/usr/bin/env bash
# Lays the /opt/kata tree (same shape as Kata's static tarball) from a release build.
#   PREFIX (default /opt/kata), CARGO_TARGET_DIR (default ./target)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/kata}
target=${CARGO_TARGET_DIR:-$here/target}/release
kernel_dir=${KERNEL_DIR:-$here/build/kernel}
debian_dir=${DEBIAN_KERNEL_DIR:-$here/build/kernel-debian}
debian="$(cat "$here/guest/kernel/debian-version")-amd64"

install -d "$PREFIX/bin" "$PREFIX/libexec" "$PREFIX/share/defaults/kata-containers" \
  "$PREFIX/share/kata-containers" "$PREFIX/share/bash-completion/completions"

for bin in kata-runtime containerd-shim-kata-v2 kata-monitor; do
  install -m 0755 "$target/$bin" "$PREFIX/bin/$bin"
done
# One shim name per handler, as Kata installs them: containerd resolves the runtime type
# io.containerd.kata-qemu.v2 to containerd-shim-kata-qemu-v2 (the same shim).
ln -sfn containerd-shim-kata-v2 "$PREFIX/bin/containerd-shim-kata-qemu-v2"

# Kata users' files name /opt/kata/bin/qemu-system-x86_64: point it at Debian's QEMU.
ln -sfn /usr/bin/qemu-system-x86_64 "$PREFIX/bin/qemu-system-x86_64"

defaults="$PREFIX/share/defaults/kata-containers"
for f in "$here"/config/configuration-*.toml; do
  install -m 0644 "$f" "$defaults/"
done
ln -sfn configuration-qemu.toml "$defaults/configuration.toml"

# The default guest: the project's kernel (vmlinux.container) and its initrd, which carries no
# modules, and the same tree as Kata's rootfs image (kata-containers.img). Debian's generic kernel and its initrd (with modules) are installed beside them, for
# comparison (see docs/architecture.md), never as the default.
assets="$PREFIX/share/kata-containers"
rm -f "$assets"/vmlinux.container "$assets"/vmlinuz.container "$assets"/kata-containers-initrd.img \
  "$assets"/kata-containers.img
if [ -f "$kernel_dir/release" ]; then
  release=$(cat "$kernel_dir/release")
  install -p -m 0644 "$kernel_dir/vmlinux-$release" "$assets/vmlinux-$release"
  install -m 0644 "$kernel_dir/config-$release" "$assets/config-$release"
  ln -sfn "vmlinux-$release" "$assets/vmlinux.container"
  # Kata's files may name vmlinuz.container: the same ELF kernel (QEMU boots it through PVH).
  ln -sfn "vmlinux-$release" "$assets/vmlinuz.container"
  initrd="$here/build/kata-containers-initrd-$release.img"
  if [ -f "$initrd" ]; then
    install -m 0644 "$initrd" "$assets/kata-containers-initrd-$release.img"
    ln -sfn "kata-containers-initrd-$release.img" "$assets/kata-containers-initrd.img"
  fi
  image="$here/build/kata-containers-$release.img"
  if [ -f "$image" ]; then
    # Running sandboxes map the installed image: never rewrite it in place. A new file is
    # renamed over it, and they keep the one they booted from.
    install -m 0644 "$image" "$assets/.kata-containers-$release.img.new"
    mv -f "$assets/.kata-containers-$release.img.new" "$assets/kata-containers-$release.img"
    ln -sfn "kata-containers-$release.img" "$assets/kata-containers.img"
  fi
fi
if [ -f "$debian_dir/vmlinux-$debian" ]; then
  install -p -m 0644 "$debian_dir/vmlinux-$debian" "$assets/vmlinux-$debian"
  install -m 0644 "$debian_dir/vmlinuz-$debian" "$assets/vmlinuz-$debian"
  install -m 0644 "$debian_dir/config-$debian" "$assets/config-$debian"
  initrd="$here/build/kata-containers-initrd-$debian.img"
  if [ -f "$initrd" ]; then
    install -m 0644 "$initrd" "$assets/kata-containers-initrd-$debian.img"
  fi
fi
if [ -x "$here/build/tools/bin/virtiofsd" ]; then
  install -m 0755 "$here/build/tools/bin/virtiofsd" "$PREFIX/libexec/virtiofsd"
fi

install -d "$PREFIX/share/kata-containers/systemd"
install -m 0644 "$here/config/systemd/kata-monitor.service" "$PREFIX/share/kata-containers/systemd/kata-monitor.service"

"$PREFIX/bin/kata-runtime" completion bash > "$PREFIX/share/bash-completion/completions/kata-runtime"
echo "installed into $PREFIX"
