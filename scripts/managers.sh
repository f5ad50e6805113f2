#!/usr/bin/env bash
# The container managers the tests run the runtime under, each private to the tests and never
# installed system-wide. Debian 12's containerd 1.6 comes from scripts/install-deps.sh; the newer
# ones are Debian trixie/sid packages (Go programs that need only libc) fetched with apt-get
# download from a private apt state and unpacked with dpkg -x into the cache, like the kernel.
#
#   scripts/managers.sh dir NAME       the directory holding NAME's binaries (fetched once)
#   scripts/managers.sh version NAME   the pinned Debian version of NAME
#   scripts/managers.sh list           the names
# NAME: containerd-1.6 | containerd-1.7 | containerd-2.1 | docker-28
#
# Versions are pinned below. Debian removes superseded versions from trixie and sid; when a
# pinned one is gone the newest of the same upstream series (e.g. 2.1.*) is taken and a line
# says so, so the matrix keeps running the series it tests.
set -euo pipefail
export LC_ALL=C
cache=${KATA_CACHE_DIR:-/var/cache/kata-rs}/managers

# name suite package=version ... (the first package's series is the matrix entry's)
pins() {
  case $1 in
    containerd-1.7) echo "trixie containerd=1.7.24~ds1-6+deb13u1" ;;
    containerd-2.1) echo "sid containerd=2.1.9+ds1-5" ;;
    docker-28) echo "sid docker.io=28.5.2+dfsg4-5 docker-cli=28.5.2+dfsg4-5" ;;
    *) return 1 ;;
  esac
}

fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_state() {
  local suite=$1 dir="$cache/apt-$1"
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" > "$dir/sources.list"
  APT=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Dir::State::status=/dev/null
       -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  if [ ! -f "$dir/updated" ] || [ -n "${refresh:-}" ]; then
    apt-get "${APT[@]}" update -qq >/dev/null 2>"$dir/update.log" \
      || fail "apt-get update for Debian $suite failed (log: $dir/update.log)"
    touch "$dir/updated"
  fi
}

# The version of package $2 to take from suite $1: the pin $3 if the suite has it, else the
# newest of the same upstream series (the pin's version up to its second dot).
resolve() {
  local suite=$1 pkg=$2 pin=$3 avail series newest
  avail=$(apt-cache "${APT[@]}" madison "$pkg" | awk -F'|' '{gsub(/ /,"",$2); print $2}')
  if grep -qxF "$pin" <<<"$avail"; then echo "$pin"; return; fi
  series=$(sed -E 's/^([0-9]+\.[0-9]+)\..*/\1/' <<<"$pin")
  newest=$(grep -E "^${series//./\\.}\." <<<"$avail" | sort -V | tail -n1 || true)
  [ -n "$newest" ] || fail "Debian $suite has no $pkg $series.* (pinned $pin; it offers: $(tr '\n' ' ' <<<"$avail")). hint: pin a version it offers in scripts/managers.sh"
  echo "managers: $pkg $pin is gone from Debian $suite; taking $newest of the same series" >&2
  echo "$newest"
}

dir_of() {
  local name=$1 spec suite want dir pkg pin ver debs
  if [ "$name" = containerd-1.6 ]; then
    command -v containerd >/dev/null || fail "containerd 1.6 is Debian 12's package: run scripts/install-deps.sh"
    dirname "$(command -v containerd)"
    return
  fi
  spec=$(pins "$name") || fail "no manager $name; use one of: $(list | tr '\n' ' ')"
  read -r suite want <<<"$spec"
  dir="$cache/$name-$(sha256sum <<<"$spec" | cut -c1-12)"
  if [ ! -f "$dir/.complete" ]; then
    apt_state "$suite"
    tmp="$dir.tmp"
    rm -rf "$tmp"; mkdir -p "$tmp/debs" "$tmp/root"
    for p in $want; do
      pkg=${p%%=*}; pin=${p#*=}
      ver=$(resolve "$suite" "$pkg" "$pin") || { refresh=1 apt_state "$suite"; ver=$(resolve "$suite" "$pkg" "$pin"); }
      (cd "$tmp/debs" && apt-get "${APT[@]}" download -qq "$pkg=$ver" >/dev/null 2>&1) \
        || fail "apt-get download $pkg=$ver from Debian $suite failed"
      echo "$pkg=$ver" >> "$tmp/versions"
    done
    for d in "$tmp"/debs/*.deb; do dpkg -x "$d" "$tmp/root"; done
    rm -rf "$tmp/debs"
    mkdir -p "$tmp/bin"
    for b in "$tmp"/root/usr/bin/* "$tmp"/root/usr/sbin/*; do
      [ -f "$b" ] && ln -s "../${b#"$tmp"/}" "$tmp/bin/$(basename "$b")"
    done
    touch "$tmp/.complete"
    rm -rf "$dir"; mv "$tmp" "$dir"
    echo "managers: $name unpacked in $dir ($(tr '\n' ' ' < "$dir/versions"))" >&2
  fi
  echo "$dir/bin"
}

list() { printf '%s\n' containerd-1.6 containerd-1.7 containerd-2.1 docker-28; }

case "${1:-}" in
  dir) [ $# -eq 2 ] || fail "usage: $0 dir NAME"; dir_of "$2" ;;
  version)
    [ $# -eq 2 ] || fail "usage: $0 version NAME"
    if [ "$2" = containerd-1.6 ]; then dpkg-query -W -f='${Version}\n' containerd; else pins "$2" | awk '{print $2}'; fi ;;
  list) list ;;
  *) fail "usage: $0 dir NAME | version NAME | list" ;;
esac
