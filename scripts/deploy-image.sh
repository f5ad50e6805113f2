#!/usr/bin/env bash
# The kata-deploy image, built locally (no registry needed): a docker-archive that
# `ctr image import` and `docker load` load, tagged kata.local/kata-deploy:RELEASE.
#   scripts/deploy-image.sh OUT.tar [RELEASE]
# RELEASE defaults to the workspace's version. The image holds:
#   /kata-artifacts/kata       the /opt/kata tree `make install` laid (PREFIX), as it is
#   /kata-artifacts/MANIFEST   each file's SHA-256 (kata-deploy checks the copy on the node)
#   /usr/bin/kata-deploy       the installer, with the shared libraries it links (this host's)
#   /bin/busybox               static, for `sh -c` and `chroot` of the restart command
# QEMU is not in it: /opt/kata/bin/qemu-system-x86_64 links to the node's /usr/bin one
# (Debian's qemu-system-x86); `kata-deploy status` says whether the node has it.
# Reproducible: names sorted, every mtime 0, owners 0, no creation date in the config, so the
# same inputs give the same bytes and the same digest (printed last: the image's config digest).
set -euo pipefail
export LC_ALL=C
umask 022
here=$(cd "$(dirname "$0")/.." && pwd)
out=$1
release=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -n1)}
prefix=${PREFIX:-/opt/kata}
target=${CARGO_TARGET_DIR:-$here/target}/release
ref=kata.local/kata-deploy:$release
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ -x "$prefix/bin/containerd-shim-kata-v2" ] || fail "$prefix holds no runtime: run \`make install\` first"
[ -x "$target/kata-deploy" ] || fail "$target/kata-deploy is missing: run \`make build\` first"
[[ $release =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || fail "release \"$release\" is not a valid image tag"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,usr/bin,etc,tmp,kata-artifacts}
chmod 1777 "$root/tmp"
cp -a "$prefix/." "$root/kata-artifacts/kata"
"$target/kata-deploy" manifest "$root/kata-artifacts"
install -m 0755 "$target/kata-deploy" "$root/usr/bin/kata-deploy"
# The libraries the installer links, at the paths its loader looks for them.
for lib in $(ldd "$target/kata-deploy" | grep -o '/[^ ]*'); do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
install -m 0755 /bin/busybox "$root/bin/busybox"
file /bin/busybox | grep -q 'statically linked' || fail "/bin/busybox is not static (install busybox-static)"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"

tar_() { tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu "$@"; }
tar_ -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin:/bin"],"Entrypoint":["/usr/bin/kata-deploy"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"kata-deploy","org.opencontainers.image.version":"$release"}},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
JSON
cfg=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/$cfg.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]\n' "$cfg" "$ref" > "$work/manifest.json"
tar_ -C "$work" -cf "$out.tmp" manifest.json "$cfg.json" layer.tar
mv "$out.tmp" "$out"
echo "$out: $ref $(du -h "$out" | cut -f1) sha256:$cfg"
