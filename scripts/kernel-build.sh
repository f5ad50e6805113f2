#!/usr/bin/env bash
# Builds the guest kernel from Debian's linux-source package (pinned in
# guest/kernel/source-version) with the configuration fragments in guest/kernel/fragments:
# `make allnoconfig` plus the fragments, every fragment line checked against the final .config,
# everything built in (no modules). Output: build/kernel/{vmlinux,config}-<release>.
#
# The result is cached by the hash of (source version, fragments, this script) in
# $KATA_CACHE_DIR (default /var/cache/kata-rs), outside the work tree: an unchanged kernel is
# never rebuilt. Same inputs give the same bytes (fixed build timestamp, user, host, version).
# One line per stage; make's own output goes to a log in the cache (its tail on failure).
#
# The release is read from the built tree (include/config/kernel.release), never from make's
# output: under `make setup` this script runs inside a make inside a make, and the inherited
# MAKEFLAGS (`w`) made `make kernelrelease` print its "Entering directory" lines into the
# release. The release is checked against the banner inside the built vmlinux before the cache
# entry is committed, and a cached entry whose release does not match its vmlinux is treated as
# absent (rebuilt). scripts/kernel-release.sh holds both checks; the kernel_release test of
# crates/guest-image runs this script from a make inside a make. `kernel-build.sh --check-cache`
# only says whether the cache entry for the current inputs is usable (exit 0) or not (exit 1).
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$here/build/kernel}
cache=${KATA_CACHE_DIR:-/var/cache/kata-rs}
srcver=$(cat "$here/guest/kernel/source-version")
fragdir="$here/guest/kernel/fragments"
jobs=${JOBS:-$(nproc)}

stage() { printf 'kernel: %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The cache key: everything that decides the bytes of the kernel.
key=$( { echo "linux-source-6.1=$srcver"; for f in "$fragdir"/*.conf; do echo "== $(basename "$f")"; cat "$f"; done; cat "$0"; } | sha256sum | cut -c1-16)
store="$cache/kernel/$key"
release_tool="$here/scripts/kernel-release.sh"
cached=0
why="absent"
if [ -f "$store/vmlinux" ] && [ -f "$store/release" ]; then
  if release=$("$release_tool" check "$store/vmlinux" "$(cat "$store/release")" 2>&1); then
    cached=1
  else
    why=$release
  fi
fi
# --check-cache: say whether the entry for these inputs is usable, build nothing.
if [ "${1:-}" = --check-cache ]; then
  if [ "$cached" -eq 1 ]; then echo "$store: $release"; exit 0; fi
  echo "$store: not usable: $why"; exit 1
fi
if [ "$cached" -eq 1 ]; then
  stage "$release cached in $store (key $key), not rebuilt"
elif [ "$why" != absent ]; then
  stage "cache entry $store is not usable ($why): rebuilding it"
  rm -rf "$store"
fi
if [ "$cached" -eq 0 ]; then
  mkdir -p "$cache/kernel-src"
  deb="$cache/kernel-src/linux-source-6.1_${srcver}_all.deb"
  if [ ! -f "$deb" ]; then
    stage "fetch linux-source-6.1=$srcver"
    (cd "$cache/kernel-src" && { apt-get download "linux-source-6.1=$srcver" 2>/dev/null \
      || { apt-get update -qq && apt-get download "linux-source-6.1=$srcver"; }; } ) >/dev/null 2>&1 \
      || fail "Debian package linux-source-6.1=$srcver is not available from the configured mirrors.
hint: 'apt-cache policy linux-source-6.1' lists the versions you can get; put one in guest/kernel/source-version."
  fi
  src="$cache/kernel-build/linux-$srcver"
  if [ ! -f "$src/.kata-unpacked" ]; then
    stage "unpack linux-source-6.1=$srcver"
    rm -rf "$src"
    mkdir -p "$src"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.1.tar.xz | tar -xJ -C "$src" --strip-components=1
    touch "$src/.kata-unpacked"
  fi
  for tool in flex bison bc gcc make; do
    command -v "$tool" >/dev/null || fail "$tool is needed to build the guest kernel (scripts/install-deps.sh installs it)"
  done

  stage "configure: allnoconfig + $(cd "$fragdir" && echo *.conf)"
  log="$cache/kernel-build/build-$key.log"
  : > "$log"
  # The date of the source package's changelog entry: a fixed, valid date (the built-in
  # initramfs takes its mtime from it too).
  KBUILD_BUILD_TIMESTAMP=$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/doc/linux-source-6.1/changelog.Debian.gz | zcat | sed -n '0,/^ -- /s/^ -- .*>  //p')
  [ -n "$KBUILD_BUILD_TIMESTAMP" ] || fail "no changelog date in $deb"
  export KBUILD_BUILD_TIMESTAMP
  export KBUILD_BUILD_USER=kata KBUILD_BUILD_HOST=kata-rs KBUILD_BUILD_VERSION=1
  export ARCH=x86_64
  kmake() { make -C "$src" -j"$jobs" "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; fail "kernel build failed at 'make $*' (full log: $log)"; }; }
  merged="$cache/kernel-build/fragments-$key.conf"
  cat "$fragdir"/*.conf > "$merged"
  kmake KCONFIG_ALLCONFIG="$merged" allnoconfig
  kmake olddefconfig

  stage "check: every fragment option survived olddefconfig"
  missing=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*)
        name=${line%%=*}
        want=$line
        ;;
      "# CONFIG_"*" is not set")
        name=${line#\# }; name=${name%% *}
        want=""
        ;;
      *) continue ;;
    esac
    got=$(grep -E "^$name=|^# $name is not set" "$src/.config" || true)
    if [ -z "$want" ]; then
      case "$got" in ""|"# $name is not set") ;; *) echo "  $name: wanted off, got '$got'" >&2; missing=1 ;; esac
    elif [ "$got" != "$want" ]; then
      echo "  $name: wanted '${want#*=}', got '${got:-not present (a dependency is off, or no such option)}'" >&2
      missing=1
    fi
  done < "$merged"
  [ "$missing" -eq 0 ] || fail "the options above did not survive olddefconfig: fix guest/kernel/fragments"

  stage "build with $jobs jobs (make log: $log)"
  t0=$(date +%s)
  kmake vmlinux
  release=$("$release_tool" tree "$src")
  "$release_tool" check "$src/vmlinux" "$release" >/dev/null
  stage "built $release in $(( $(date +%s) - t0 )) s"
  tmp="$store.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # No symbols in the shipped file; QEMU reads only the loadable segments.
  strip -o "$tmp/vmlinux" "$src/vmlinux"
  (cd "$here" && cargo build --release -q -p kata-guest-image)
  "$here/target/release/kata-guest-image" --trim-kernel "$tmp/vmlinux"
  cp "$src/.config" "$tmp/config"
  echo "$release" > "$tmp/release"
  # What is committed to the cache is checked as a later run will check it.
  "$release_tool" check "$tmp/vmlinux" "$release" >/dev/null
  sha256sum "$tmp/vmlinux" | cut -d' ' -f1 > "$tmp/sha256"
  rm -rf "$store"
  mv "$tmp" "$store"
fi

mkdir -p "$OUT"
rm -f "$OUT"/vmlinux-* "$OUT"/config-*
cp "$store/vmlinux" "$OUT/vmlinux-$release"
cp "$store/config" "$OUT/config-$release"
echo "$release" > "$OUT/release"
stage "$release: $(du -h "$OUT/vmlinux-$release" | cut -f1) vmlinux (sha256 $(cut -c1-16 "$store/sha256")) in $OUT"
