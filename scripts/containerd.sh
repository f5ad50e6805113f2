#!/usr/bin/env bash
# A private containerd for Kata (own root, state and socket; never disturbs a system containerd),
# with the guide's kata runtime stanza for the CRI plugin. It runs in its own network namespace
# (kata-containerd): the CNI bridge of its pods (config/cni, 198.51.100.0/24, no masquerade)
# stays there, off the host's network. Prints the socket path.
#   scripts/containerd.sh start | stop | socket
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
base=/run/kata-containerd
netns=kata-containerd
cni_conf=/etc/kata-containers/cni/net.d
sock=$base/containerd.sock
conf=/etc/kata-containers/containerd-kata.toml
cmd=${1:-start}
case $cmd in
  socket) echo "$sock"; exit 0 ;;
  stop)
    if [ -f "$base/pid" ]; then kill "$(cat "$base/pid")" 2>/dev/null || true; sleep 1; fi
    rm -f "$base/pid"
    ip netns del "$netns" 2>/dev/null || true
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|socket" >&2; exit 2 ;;
esac
mkdir -p "$base" /etc/kata-containers /var/lib/kata-containerd "$cni_conf"
# The CRI plugin reloads the CNI configuration when it changes, also while running.
cp "$here/config/cni/10-kata.conflist" "$cni_conf/"
if [ -S "$sock" ] && ctr -a "$sock" version >/dev/null 2>&1; then echo "$sock"; exit 0; fi
cat > "$conf" <<TOML
version = 2
root = "/var/lib/kata-containerd"
state = "$base/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  # No registry here: the pod sandbox image is built locally (scripts/busybox-image.sh).
  sandbox_image = "kata.local/pause:3.6"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$cni_conf"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
  privileged_without_host_devices = true
  pod_annotations = ["io.katacontainers.*"]
  container_annotations = ["io.katacontainers.*"]
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]
    ConfigPath = "/opt/kata/share/defaults/kata-containers/configuration.toml"
TOML
ip netns add "$netns" 2>/dev/null || true
ip -n "$netns" link set lo up
# containerd finds the shim binary on its PATH.
ln -sfn /opt/kata/bin/containerd-shim-kata-v2 /usr/local/bin/containerd-shim-kata-v2
PATH=/usr/local/bin:$PATH nohup nsenter --net="/run/netns/$netns" containerd --config "$conf" >> "$base/containerd.log" 2>&1 &
echo $! > "$base/pid"
for _ in $(seq 1 100); do
  if ctr -a "$sock" version >/dev/null 2>&1; then echo "$sock"; exit 0; fi
  sleep 0.1
done
echo "error: containerd did not start; see $base/containerd.log" >&2
tail -20 "$base/containerd.log" >&2
exit 1
