#!/usr/bin/env bash
# Builds a small busybox image as a docker-archive (no registry needed):
#   scripts/busybox-image.sh OUT.tar [REF [ENTRYPOINT_JSON]]
# REF defaults to kata.local/busybox:latest (command `sh`). With ENTRYPOINT_JSON (a JSON array)
# the image runs that instead, e.g. the pod sandbox ("pause") image of scripts/containerd.sh.
# SYMLINKS="path:target ..." adds symlinks to the image (the hostile images of the security
# tests, e.g. SYMLINKS="escape:/ dots:../../../..").
# FILES="host-path:image-path ..." copies host files into the image (the tests' static helpers).
set -euo pipefail
out=$1
ref=${2:-kata.local/busybox:latest}
entrypoint=${3:-}
if [ -n "$entrypoint" ]; then run="\"Entrypoint\":$entrypoint"; else run='"Cmd":["sh"]'; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
for link in ${SYMLINKS:-}; do ln -s "${link#*:}" "$root/${link%%:*}"; done
for f in ${FILES:-}; do install -D -m 0755 "${f%%:*}" "$root/${f#*:}"; done
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],$run,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
JSON
cfg=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/$cfg.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]\n' "$cfg" "$ref" > "$work/manifest.json"
tar -C "$work" -cf "$out" manifest.json "$cfg.json" layer.tar
echo "$out: $ref"
