#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the runtime need. Idempotent and quick
# when everything is present (no 'apt-get update' then).
set -euo pipefail
packages=(
  qemu-system-x86   # the hypervisor
  containerd runc   # the container manager, and runc for side-by-side tests
  kmod              # depmod for Debian's guest kernel's modules
  flex bison bc libelf-dev   # building the guest kernel
  cpio              # initrd packing
  busybox-static    # debug console and test images
  xz-utils          # vmlinux extraction
  libcap-ng-dev libseccomp-dev   # building virtiofsd
  protobuf-compiler # CRI protos
  iproute2          # network namespaces in tests
  iptables          # copied into the guest image for kata-runtime iptables
  prometheus        # promtool for metrics tests
  python3-matplotlib          # the benchmark chart
  containernetworking-plugins # pod networks (bridge, host-local, loopback) for CRI tests
  tmux              # drives kata-runtime exec in a real terminal in tests
  e2fsprogs xfsprogs          # direct-volume tests (ext4 and xfs on loop devices)
  jq curl
  gcc libc6-dev     # the linker cargo uses, and the tests' small static helpers
  python3-venv      # the offline schema check of deploy/ (scripts/check-manifests.sh)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "Debian packages: all present"
  exit 0
fi
echo "Debian packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
