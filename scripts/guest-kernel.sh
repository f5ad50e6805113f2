#!/usr/bin/env bash
# The guest kernel. KERNEL=kata (default): built from Debian's linux-source package with the
# configuration fragments in guest/kernel/fragments (scripts/kernel-build.sh), into build/kernel.
# KERNEL=debian: Debian's prebuilt generic kernel and its modules (scripts/kernel-debian.sh),
# into build/kernel-debian. KERNEL=all: both.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
case "${KERNEL:-kata}" in
  kata) exec "$here/scripts/kernel-build.sh" ;;
  debian) exec "$here/scripts/kernel-debian.sh" ;;
  all) "$here/scripts/kernel-build.sh" && exec "$here/scripts/kernel-debian.sh" ;;
  *) echo "error: KERNEL=${KERNEL} is not a guest kernel; use KERNEL=kata (built here), debian or all" >&2; exit 1 ;;
esac
