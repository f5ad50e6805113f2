#!/usr/bin/env bash
# Builds virtiofsd (rust-vmm, from crates.io) into build/tools unless already there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=1.14.0
out="$here/build/tools"
if [ -x "$out/bin/virtiofsd" ] && "$out/bin/virtiofsd" --version 2>/dev/null | grep -q "$version"; then
  echo "virtiofsd $version already in $out"
  exit 0
fi
cargo install --locked --quiet --root "$out" --version "$version" virtiofsd
