#!/usr/bin/env bash
# One command for a fresh Debian machine (as root): Debian packages, the build, the guest
# kernel and initrd, the /opt/kata tree, a containerd configured for the runtime, a local
# busybox image, then the guide's commands: containers in VMs via ctr.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (it installs packages and /opt/kata)" >&2; exit 1; }
scripts/install-deps.sh
make install
echo
echo "== kata-runtime check"
set +e
/opt/kata/bin/kata-runtime check
rc=$?
set -e
case $rc in
  0) echo "== this host runs Kata VMs with KVM" ;;
  2) echo "== this host runs Kata VMs with TCG emulation (no usable KVM)" ;;
  *) echo "== kata-runtime check found problems (exit $rc)"; exit $rc ;;
esac
echo
echo "== containerd with the kata runtime"
sock=$(scripts/containerd.sh start)
echo "containerd socket: $sock (config /etc/kata-containers/containerd-kata.toml)"
scripts/busybox-image.sh /tmp/kata-busybox.tar kata.local/busybox:latest
ctr -a "$sock" images import /tmp/kata-busybox.tar >/dev/null
tty_flag=()
[ -t 0 ] && [ -t 1 ] && tty_flag=(-t)
echo
echo "== ctr run --runtime io.containerd.kata.v2 ${tty_flag[*]} --rm kata.local/busybox:latest hello sh -c \"uname -r; free -h\""
ctr -a "$sock" run --runtime io.containerd.kata.v2 "${tty_flag[@]}" --rm kata.local/busybox:latest hello sh -c "echo guest kernel: \$(uname -r); free -h"
echo
echo "== the same with --memory-limit 536870912: the VM grows by 512 MiB"
ctr -a "$sock" run --runtime io.containerd.kata.v2 "${tty_flag[@]}" --memory-limit 536870912 --rm kata.local/busybox:latest hello sh -c "echo guest kernel: \$(uname -r); free -h"
echo
echo "host kernel: $(uname -r)"
echo "Try it yourself: ctr -a $sock run --runtime io.containerd.kata.v2 -t --rm kata.local/busybox:latest hello sh"
