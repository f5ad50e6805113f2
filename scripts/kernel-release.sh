#!/usr/bin/env bash
# The guest kernel's release string, read so that no make output can leak into it.
#   kernel-release.sh tree SRC            the release of a built kernel tree, from
#                                         SRC/include/config/kernel.release
#   kernel-release.sh banner VMLINUX      the release in VMLINUX's "Linux version R (" banner
#   kernel-release.sh check VMLINUX REL   prints REL if it is a well-formed release equal to
#                                         VMLINUX's banner; else says what differs, exit 1
# scripts/kernel-build.sh uses these before it commits a cache entry and before it trusts one.
set -euo pipefail
export LC_ALL=C

usage() { echo "usage: $0 tree SRC | banner VMLINUX | check VMLINUX RELEASE" >&2; exit 2; }

# One line of letters, digits and . + _ - (what the kernel's own setlocalversion produces).
well_formed() { [[ $1 =~ ^[0-9]+\.[0-9]+[0-9A-Za-z.+_-]*$ ]]; }

banner() {
  local v=$1 line
  [ -f "$v" ] || { echo "error: no file $v" >&2; return 1; }
  line=$(grep -a -o -m1 -E 'Linux version [0-9][0-9A-Za-z.+_-]* \(' "$v" | head -n1) || true
  [ -n "$line" ] || { echo "error: $v has no 'Linux version' banner: not a kernel image" >&2; return 1; }
  line=${line#Linux version }
  echo "${line% (}"
}

case "${1:-}" in
  tree)
    [ $# -eq 2 ] || usage
    f="$2/include/config/kernel.release"
    [ -f "$f" ] || { echo "error: $f is missing: the kernel tree $2 is not configured and built" >&2; exit 1; }
    [ "$(wc -l < "$f")" -eq 1 ] || { echo "error: $f holds $(wc -l < "$f") lines, not one release" >&2; exit 1; }
    rel=$(cat "$f")
    well_formed "$rel" || { echo "error: $f holds '$rel', not a kernel release" >&2; exit 1; }
    echo "$rel"
    ;;
  banner)
    [ $# -eq 2 ] || usage
    banner "$2"
    ;;
  check)
    [ $# -eq 3 ] || usage
    rel=$3
    if ! well_formed "$rel"; then
      echo "release '$(printf '%s' "$rel" | tr '\n' ' ' | cut -c1-80)' is not a kernel release" >&2
      exit 1
    fi
    got=$(banner "$2")
    [ "$got" = "$rel" ] || { echo "release '$rel' differs from $2's banner '$got'" >&2; exit 1; }
    echo "$rel"
    ;;
  *) usage ;;
esac
