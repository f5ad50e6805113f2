#!/usr/bin/env bash
# A private containerd for Kata (own root, state and socket; never disturbs a system containerd),
# with the guide's kata runtime stanza for the CRI plugin. It runs in its own network namespace:
# the CNI bridge of its pods (config/cni, 198.51.100.0/24, no masquerade) stays there, off the
# host's network. Prints the socket path.
#
#   scripts/containerd.sh start|stop|socket|netns|bin|config [VERSION]
#
# VERSION picks the manager (scripts/managers.sh): 1.6 (Debian 12's, the default), 1.7 or 2.1.
# 1.6 and 1.7 get a version 2 configuration, 2.x a version 3 one (docs/containerd.md shows both).
# Each VERSION has its own socket, root, state, configuration and network namespace, so several
# run side by side:
#   1.6: /run/kata-containerd/containerd.sock, netns kata-containerd (what the tests always used)
#   other: /run/kata-containerd-<v>/containerd.sock, netns kata-containerd-<v>
#   socket, netns and config print that version's socket, namespace and configuration file;
#   bin prints the directory of its containerd and ctr.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-start}
version=${2:-1.6}
case $version in
  1.6|1.7|2.1) ;;
  *) echo "error: containerd $version is not in the test matrix; use 1.6, 1.7 or 2.1" >&2; exit 2 ;;
esac
if [ "$version" = 1.6 ]; then
  name=kata-containerd
else
  name=kata-containerd-$version
fi
base=/run/$name
netns=$name
root=/var/lib/$name
cni_conf=/etc/kata-containers/cni/net.d
sock=$base/containerd.sock
conf=/etc/kata-containers/${name/kata-containerd/containerd-kata}.toml
bindir() { "$here/scripts/managers.sh" dir "containerd-$version"; }
case $cmd in
  socket) echo "$sock"; exit 0 ;;
  netns) echo "$netns"; exit 0 ;;
  config) echo "$conf"; exit 0 ;;
  bin) bindir; exit 0 ;;
  stop)
    # The pid file outlives a reboot where /run is not a tmpfs: its number may be another
    # process by now, which is never signalled.
    pid=$(cat "$base/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = containerd ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$base/pid"
    ip netns del "$netns" 2>/dev/null || true
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|socket|netns|bin|config [1.6|1.7|2.1]" >&2; exit 2 ;;
esac
bin=$(bindir)
ctr="$bin/ctr"
mkdir -p "$base" /etc/kata-containers "$root" "$cni_conf"
# One start at a time per version: tests running in parallel each ask for the same containerd,
# and two writers of the configuration (or two containerds on one socket) must not race.
exec 9>"$base.lock"
flock 9
# The CRI plugin reloads the CNI configuration when it changes, also while running.
cp "$here/config/cni/10-kata.conflist" "$cni_conf/"

# The kata runtime's stanza, the same keys in both versions (only the table's name differs).
kata_runtime() { # $1: the runtimes table
  cat <<TOML
[$1.runc]
  runtime_type = "io.containerd.runc.v2"
[$1.kata]
  runtime_type = "io.containerd.kata.v2"
  privileged_without_host_devices = true
  pod_annotations = ["io.katacontainers.*"]
  container_annotations = ["io.katacontainers.*"]
  [$1.kata.options]
    ConfigPath = "/opt/kata/share/defaults/kata-containers/configuration.toml"
TOML
}

# What both versions share: this containerd's own root, state and sockets.
paths() { # $1: the configuration version
  cat <<TOML
version = $1
root = "$root"
state = "$base/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
TOML
}

# CRI gives a pod's sandbox container oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE,
# which a host that is itself confined (this CI's machines) does not have: runc then fails
# ("can't get final child's PID from pipe"). There, CRI clamps every container's value to
# containerd's own, as for rootless containerd; kata and runc get the same values.
restrict_oom=false
capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if [ $(( 0x$capeff >> 24 & 1 )) -eq 0 ]; then restrict_oom=true; fi

if [ "$version" = 2.1 ]; then
  cat > "$conf.new" <<TOML
$(paths 3)
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  # No registry here: the pod sandbox image is built locally (scripts/busybox-image.sh).
  sandbox = "kata.local/pause:3.6"
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "$cni_conf"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = $restrict_oom
[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"
$(kata_runtime "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes")
# The same runtime through containerd 2.x's sandbox API: no pause container (docs/containerd.md).
# No options table: with a sandbox endpoint containerd 2.1 passes runc-typed task options to
# every container and refuses others ("can't unmarshal type runtimeoptions.v1.Options"); the
# shim finds its configuration in the default places (or KATA_CONF_FILE).
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata-sandbox-api]
  runtime_type = "io.containerd.kata.v2"
  sandboxer = "shim"
  privileged_without_host_devices = true
  pod_annotations = ["io.katacontainers.*"]
  container_annotations = ["io.katacontainers.*"]
TOML
else
  cat > "$conf.new" <<TOML
$(paths 2)
[plugins."io.containerd.grpc.v1.cri"]
  # No registry here: the pod sandbox image is built locally (scripts/busybox-image.sh).
  sandbox_image = "kata.local/pause:3.6"
  restrict_oom_score_adj = $restrict_oom
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$cni_conf"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
$(kata_runtime 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes')
TOML
fi
# A running containerd is used as it is when its configuration is the one this script writes;
# one started by an older version of this script is restarted with the new configuration.
if [ -S "$sock" ] && "$ctr" -a "$sock" version >/dev/null 2>&1; then
  if cmp -s "$conf.new" "$conf"; then
    rm -f "$conf.new"
    echo "$sock"
    exit 0
  fi
  echo "containerd $version: its configuration changed; restarting it" >&2
  "$0" stop "$version"
fi
mv "$conf.new" "$conf"
# A name left in /run/netns by a previous boot (where /run is not a tmpfs) is a plain file, no
# longer a namespace: it is made again.
if ! ip netns exec "$netns" true 2>/dev/null; then
  ip netns del "$netns" 2>/dev/null || true
  ip netns add "$netns"
fi
ip -n "$netns" link set lo up
# containerd finds the shim binary on its PATH; its own runc shim comes first.
ln -sfn /opt/kata/bin/containerd-shim-kata-v2 /usr/local/bin/containerd-shim-kata-v2
PATH=$bin:/usr/local/bin:$PATH nohup nsenter --net="/run/netns/$netns" "$bin/containerd" --config "$conf" >> "$base/containerd.log" 2>&1 9>&- &
echo $! > "$base/pid"
for _ in $(seq 1 150); do
  if "$ctr" -a "$sock" version >/dev/null 2>&1; then echo "$sock"; exit 0; fi
  sleep 0.1
done
echo "error: containerd $version did not start; see $base/containerd.log" >&2
tail -20 "$base/containerd.log" >&2
exit 1
