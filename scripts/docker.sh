#!/usr/bin/env bash
# A private Docker daemon for the tests (Debian sid's Docker 28, unpacked by scripts/managers.sh,
# never installed): its own socket, data root, exec root and network namespace, on the private
# containerd 1.7 of scripts/containerd.sh (Docker's containers live in its containerd namespace
# `moby`). Its bridge (docker0, 203.0.113.0/24), iptables rules and published ports stay in the
# namespace `kata-docker`; the host's network is never touched. Prints the socket path.
#
#   scripts/docker.sh start|stop|socket|netns|bin|config
#
#   socket: the daemon's socket (docker -H unix://<socket>)
#   netns:  the namespace dockerd (and its bridge and published ports) lives in
#   bin:    the directory of docker and dockerd
#   config: the daemon.json it runs with (the `kata` runtime stanza of docs/containerd.md)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-start}
containerd_version=1.7
base=/run/kata-docker
netns=kata-docker
root=/var/lib/kata-docker
sock=$base/docker.sock
conf=/etc/kata-containers/docker-daemon.json
bindir() { "$here/scripts/managers.sh" dir docker-28; }
case $cmd in
  socket) echo "$sock"; exit 0 ;;
  netns) echo "$netns"; exit 0 ;;
  config) echo "$conf"; exit 0 ;;
  bin) bindir; exit 0 ;;
  stop)
    # The pid file outlives a reboot where /run is not a tmpfs: its number may be another
    # process by now, which is never signalled.
    pid=$(cat "$base/docker.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$base/docker.pid" "$base/containerd.pid"
    ip netns del "$netns" 2>/dev/null || true
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|socket|netns|bin|config" >&2; exit 2 ;;
esac
bin=$(bindir)
# Its containerd first (it may have been stopped under a running dockerd, which reconnects).
containerd_sock=$("$here/scripts/containerd.sh" start "$containerd_version")
containerd_bin=$("$here/scripts/containerd.sh" bin "$containerd_version")
containerd_pid=$(cat "$(dirname "$containerd_sock")/pid" 2>/dev/null || true)
if [ -S "$sock" ] && "$bin/docker" -H "unix://$sock" version >/dev/null 2>&1; then
  # A dockerd whose containerd was restarted since it started does not reconnect in time:
  # it runs only with the containerd it was started with.
  if [ "$(cat "$base/containerd.pid" 2>/dev/null || true)" = "$containerd_pid" ]; then
    echo "$sock"; exit 0
  fi
  echo "dockerd: its containerd was restarted; restarting dockerd" >&2
  "$0" stop
fi
# Nothing answers on the socket: a dockerd left from before (hung, or the pid file of one that
# died or of a previous boot, which dockerd refuses to start over) is cleared first.
"$0" stop
mkdir -p "$base" "$root" /etc/kata-containers
# The runtimes stanza is what a user adds to /etc/docker/daemon.json (docs/containerd.md);
# `docker run --runtime io.containerd.kata.v2` works without it.
cat > "$conf" <<'JSON'
{
  "bip": "203.0.113.1/24",
  "default-address-pools": [{ "base": "198.18.0.0/16", "size": 24 }],
  "runtimes": {
    "kata": {
      "runtimeType": "io.containerd.kata.v2",
      "options": {
        "ConfigPath": "/opt/kata/share/defaults/kata-containers/configuration.toml"
      }
    }
  }
}
JSON
# A name left in /run/netns by a previous boot (where /run is not a tmpfs) is a plain file, no
# longer a namespace: it is made again.
if ! ip netns exec "$netns" true 2>/dev/null; then
  ip netns del "$netns" 2>/dev/null || true
  ip netns add "$netns"
fi
ip -n "$netns" link set lo up
# dockerd finds docker-proxy (published ports) on its PATH.
PATH=$bin:$containerd_bin:/usr/local/bin:$PATH nohup nsenter --net="/run/netns/$netns" \
  "$bin/dockerd" --config-file "$conf" --containerd "$containerd_sock" \
  --data-root "$root" --exec-root "$base/exec" --pidfile "$base/docker.pid" \
  -H "unix://$sock" >> "$base/dockerd.log" 2>&1 &
for _ in $(seq 1 300); do
  if "$bin/docker" -H "unix://$sock" version >/dev/null 2>&1; then
    echo "$containerd_pid" > "$base/containerd.pid"
    echo "$sock"; exit 0
  fi
  sleep 0.1
done
echo "error: dockerd did not start; see $base/dockerd.log" >&2
tail -20 "$base/dockerd.log" >&2
exit 1
