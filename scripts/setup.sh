#!/usr/bin/env bash
# One command for a fresh Debian machine (as root): Debian packages, the build, the guest
# kernel, the /opt/kata tree, then a check of the host.
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
echo "== effective configuration"
/opt/kata/bin/kata-runtime env
