#!/usr/bin/python3
"""Benchmarks kata against runc on this machine (see BENCHMARKS.md).

Measures, with the real containerd, kata against runc: cold start (`ctr run --rm IMAGE true`)
with its breakdown from the shim's tracing spans, the raw-QEMU floor (the sandbox's own QEMU
command line replayed to the agent's first console line), exec latency, idle host memory (PSS)
of 1 and N sandboxes at once, and shared-filesystem throughput (virtio-fs, virtio-9p, runc).
Writes every sample to a JSON file, the tables into a Markdown file (between its bench markers)
and a PNG chart.

    scripts/bench.py [--iterations N] [--concurrent N] [--fs-mib N] [--files N]
                     [--out bench/results.json] [--markdown BENCHMARKS.md] [--chart bench/chart.png]
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "kata.local/busybox:latest"
RUNTIMES = {"runc": "io.containerd.runc.v2", "kata": "io.containerd.kata.v2"}
DEFAULT_CONFIG = "/opt/kata/share/defaults/kata-containers/configuration.toml"
ASSETS = "/opt/kata/share/kata-containers"
DEBIAN_PIN = os.path.join(HERE, "guest", "kernel", "debian-version")


def config_value(text, key):
    """The first `key = value` of a TOML text, as a string (quotes stripped)."""
    m = re.search(rf"^\s*{re.escape(key)}\s*=\s*(.+?)\s*(#.*)?$", text, re.M)
    if not m:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no {key} line")
    return m.group(1).strip('"')


def set_key(text, key, value):
    """`text` with the first `key = ...` line set to the string `value`."""
    return re.sub(rf'^(\s*{re.escape(key)}\s*=\s*).*$', rf'\g<1>"{value}"', text, count=1, flags=re.M)


def guest_configs(work):
    """{guest name: (config path or None for the installed default, kernel file, root)}: the
    project's kernel with the rootfs image (NVDIMM, DAX) and with the initrd, one of which is the
    installed default, and Debian's generic kernel with its own initrd (modules)."""
    with open(DEFAULT_CONFIG) as f:
        text = f.read()
    default_kernel = os.path.realpath(config_value(text, "kernel"))
    default_root = "image" if config_value(text, "image") else "initrd"
    with open(DEBIAN_PIN) as f:
        ver = f.read().strip() + "-amd64"
    kernel, initrd = f"{ASSETS}/vmlinux-{ver}", f"{ASSETS}/kata-containers-initrd-{ver}.img"
    image, own_initrd = f"{ASSETS}/kata-containers.img", f"{ASSETS}/kata-containers-initrd.img"
    for path in (kernel, initrd, image, own_initrd):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: 'make install' installs it")

    def write(name, body):
        path = os.path.join(work, f"configuration-{name}.toml")
        with open(path, "w") as f:
            f.write(body)
        return path

    debian = set_key(set_key(set_key(text, "kernel", kernel), "initrd", initrd), "image", "")
    guests = {f"kata-rs {default_root}": (None, default_kernel, default_root)}
    if default_root == "image":
        other = set_key(set_key(text, "image", ""), "initrd", own_initrd)
        guests["kata-rs initrd"] = (write("initrd", other), default_kernel, "initrd")
    else:
        other = set_key(set_key(text, "image", image), "initrd", "")
        guests["kata-rs image"] = (write("image", other), default_kernel, "image")
    guests["debian initrd"] = (write("debian-kernel", debian), kernel, "initrd")
    return guests


def runtime_args(cfg):
    return ["--runtime-config-path", cfg] if cfg else []


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {r.returncode}: {r.stderr.strip()}")
    return r


def ctr(sock, *args, check=True):
    return sh("ctr", "-a", sock, *args, check=check)


def pids_matching(needle):
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle(cmd):
            out.append(int(pid))
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


QEMU_PARTS = ("guest RAM", "anonymous (QEMU heap, TCG code cache)", "guest kernel file", "rootfs image file",
              "initrd file", "QEMU binary and libraries", "other")


def qemu_breakdown_kib(pid):
    """QEMU's PSS by what is mapped: guest RAM, its anonymous memory, the files it maps."""
    parts = dict.fromkeys(QEMU_PARTS, 0)
    name = "other"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    fields = line.split(maxsplit=5)
                    path = fields[5].strip() if len(fields) > 5 else ""
                    if "memory-backend" in path or path.startswith("/dev/hugepages"):
                        name = "guest RAM"
                    elif path in ("", "[heap]", "[stack]") or path.startswith("[anon"):
                        name = "anonymous (QEMU heap, TCG code cache)"
                    elif "/vmlinu" in path:
                        name = "guest kernel file"
                    elif "initrd" in path:
                        name = "initrd file"
                    elif path.endswith(".img"):
                        name = "rootfs image file"
                    elif "qemu" in path or ".so" in path:
                        name = "QEMU binary and libraries"
                    else:
                        name = "other"
                elif line.startswith("Pss:"):
                    parts[name] += int(line.split()[1])
    except OSError:
        pass
    return parts


def summary(samples):
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "samples": samples}


def timed(fn):
    start = time.perf_counter()
    fn()
    return round((time.perf_counter() - start) * 1000, 1)


def wait_running(sock, cid):
    deadline = time.time() + 120
    while time.time() < deadline:
        out = ctr(sock, "task", "ls").stdout
        if any(l.startswith(cid) and "RUNNING" in l for l in out.splitlines()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"task {cid} never ran")


def start_detached(sock, rt, cid, cfg=None):
    remove(sock, cid)
    ctr(sock, "run", "-d", "--runtime", rt, *runtime_args(cfg), IMAGE, cid, "sleep", "1000")
    wait_running(sock, cid)


def remove(sock, cid):
    if cid in ctr(sock, "task", "ls", "-q").stdout.split():
        ctr(sock, "task", "kill", "-s", "SIGKILL", cid, check=False)
        deadline = time.time() + 30
        while ctr(sock, "task", "rm", cid, check=False).returncode != 0 and time.time() < deadline:
            time.sleep(0.2)
    if cid in ctr(sock, "container", "ls", "-q").stdout.split():
        ctr(sock, "container", "rm", cid, check=False)


def bench_cold_start(sock, n, name, rt, cfg=None):
    samples = [timed(lambda i=i: ctr(sock, "run", "--runtime", rt, *runtime_args(cfg), "--rm", IMAGE,
                                     f"bench-start-{name}-{i}", "true")) for i in range(n)]
    return summary(samples)


def bench_pod_start(n, version="2.1"):
    """A CRI pod (RunPodSandbox, then one container running, then stop and remove) through
    containerd VERSION's CRI plugin, with the `kata` handler (containerd runs a pause container
    in the VM) and `kata-sandbox-api` (containerd 2.x's sandbox API: the shim is asked for the
    pod, no pause container); crates/shim/examples/pod_start.rs drives it as a kubelet would."""
    cs = os.path.join(HERE, "scripts", "containerd.sh")
    sock = sh(cs, "start", version).stdout.strip()
    ctr_bin = os.path.join(sh(cs, "bin", version).stdout.strip(), "ctr")
    pause = '["/bin/sh","-c","trap \'exit 0\' TERM INT; while :; do sleep 3600 & wait $!; done"]'
    for ref, entry in ((IMAGE, None), ("kata.local/pause:3.6", pause)):
        tar = f"/tmp/kata-bench-pod-{ref.replace('/', '_').replace(':', '_')}.tar"
        sh(os.path.join(HERE, "scripts", "busybox-image.sh"), tar, ref, *([entry] if entry else []))
        sh(ctr_bin, "-a", sock, "-n", "k8s.io", "images", "import", tar)
        os.unlink(tar)
    sh("cargo", "build", "--quiet", "--manifest-path", os.path.join(HERE, "Cargo.toml"),
       "-p", "containerd-shim-kata-v2", "--example", "pod_start")
    tool = os.path.join(HERE, "target", "debug", "examples", "pod_start")
    res = {"containerd": version}
    for handler in ("kata", "kata-sandbox-api"):
        out = json.loads(sh(tool, sock, handler, str(n)).stdout)
        res[handler] = {k: summary(v) for k, v in out.items()}
    return res


def bench_exec(sock, n):
    res = {}
    for name, rt in RUNTIMES.items():
        cid = f"bench-exec-{name}"
        start_detached(sock, rt, cid)
        samples = [timed(lambda i=i: ctr(sock, "task", "exec", "--exec-id", f"e{i}", cid, "true")) for i in range(n)]
        remove(sock, cid)
        res[name] = summary(samples)
    return res


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sandbox_pids(cid):
    shim = pids_matching(lambda c: "containerd-shim" in c and f" -id {cid} " in f" {c} ")
    # A VM taken from the VMCache keeps its cache name on QEMU's and virtiofsd's command lines.
    try:
        with open(f"/run/vc/vm/{cid}/adopted-from") as f:
            born = f.read().strip()
    except OSError:
        born = cid
    qemu = pids_matching(lambda c: f"-name sandbox-{born} " in c)
    vfsd = pids_matching(lambda c: c.startswith("/opt/kata/libexec/virtiofsd") and f"/run/vc/vm/{born}/" in c)
    return shim, qemu, vfsd


def bench_memory(sock, counts, variants):
    """Idle PSS per sandbox with 1 and with N sandboxes running at once, for each
    (name, runtime, config) variant."""
    res = {}
    for name, rt, cfg in variants:
        res[name] = {}
        for n in counts:
            cids = [f"bench-mem-{name.replace(' ', '-')}-{i}" for i in range(n)]
            for cid in cids:
                start_detached(sock, rt, cid, cfg)
            time.sleep(5)
            per = []
            for cid in cids:
                shim, qemu, vfsd = sandbox_pids(cid)
                e = {"shim_pss_kib": sum(pss_kib(p) for p in shim), "shim_rss_kib": sum(rss_kib(p) for p in shim)}
                parts = {}
                if rt == RUNTIMES["kata"]:
                    e["qemu_pss_kib"] = sum(pss_kib(p) for p in qemu)
                    e["virtiofsd_pss_kib"] = sum(pss_kib(p) for p in vfsd)
                    for p in qemu:
                        for k, v in qemu_breakdown_kib(p).items():
                            parts[k] = parts.get(k, 0) + v
                e["total_pss_kib"] = sum(v for k, v in e.items() if k.endswith("_pss_kib"))
                per.append((e, parts))
            for cid in cids:
                remove(sock, cid)
            mean = {k: round(statistics.mean(e[k] for e, _ in per)) for k in per[0][0]}
            entry = {"mean": mean, "samples": [e for e, _ in per]}
            if per[0][1]:
                entry["qemu_breakdown_kib"] = {k: round(statistics.mean(p.get(k, 0) for _, p in per)) for k in QEMU_PARTS}
            res[name][str(n)] = entry
    return res


def guest_meminfo(sock, cfg):
    """MemTotal and MemAvailable (KiB) as the guest kernel reports them to a container, 5 s after
    start (the same idle point as the memory figure)."""
    out = ctr(sock, "run", "--rm", "--runtime", RUNTIMES["kata"], *runtime_args(cfg), IMAGE, "bench-meminfo",
              "sh", "-c", "sleep 5; cat /proc/meminfo").stdout
    info = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        if k in ("MemTotal", "MemAvailable"):
            info[k.lower() + "_kib"] = int(v.split()[0])
    if len(info) != 2:
        raise RuntimeError(f"no MemTotal/MemAvailable in the guest's /proc/meminfo: {out!r}")
    return info


# --- metrics: the shims' monitor sockets and kata-monitor --------------------------------------

class UnixHTTPConnection(__import__("http.client").client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("shim", timeout=timeout)
        self.path = path

    def connect(self):
        import socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def get_ms(conn_factory, path):
    c = conn_factory()
    t0 = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    ms = (time.perf_counter() - t0) * 1000
    c.close()
    if r.status != 200 or not body:
        raise RuntimeError(f"GET {path}: {r.status}")
    return ms


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 1)


def bench_scrape(sock, counts, n=30):
    """Latency of the shim's /metrics and of kata-monitor's /metrics (median, p99) with 1 and N
    sandboxes, and kata-monitor's RSS."""
    import http.client
    import socket as so
    with so.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mon = subprocess.Popen(["/opt/kata/bin/kata-monitor", "--listen-address", f"127.0.0.1:{port}",
                            "--runtime-endpoint", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                get_ms(lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/")
                break
            except OSError:
                time.sleep(0.1)
        for count in counts:
            cids = [f"bench-scrape-{i}" for i in range(count)]
            for cid in cids:
                start_detached(sock, RUNTIMES["kata"], cid)
            time.sleep(3)
            shim = [get_ms(lambda: UnixHTTPConnection(f"/run/vc/sbs/{cids[i % count]}/shim-monitor.sock"), "/metrics")
                    for i in range(n)]
            monitor = [get_ms(lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30), "/metrics")
                       for _ in range(n)]
            res[str(count)] = {
                "shim_ms": {"median": round(statistics.median(shim), 1), "p99": pct(shim, 99), "samples": [round(x, 1) for x in shim]},
                "monitor_ms": {"median": round(statistics.median(monitor), 1), "p99": pct(monitor, 99), "samples": [round(x, 1) for x in monitor]},
                "monitor_rss_kib": rss_kib(mon.pid),
            }
            for cid in cids:
                remove(sock, cid)
    finally:
        mon.kill()
        mon.wait()
    return res


# --- the raw-QEMU floor --------------------------------------------------------------------------

def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


def bench_floor(sock, n, cfg=None):
    """Replays the exact QEMU and virtiofsd command lines of a kata sandbox (same kernel, initrd,
    accelerator, memory and devices), started by the bench, to the agent's first console line."""
    cid = "bench-floor-src"
    start_detached(sock, RUNTIMES["kata"], cid, cfg)
    _, qemu, vfsd = sandbox_pids(cid)
    if len(qemu) != 1:
        raise RuntimeError(f"expected one QEMU for {cid}, found {qemu}")
    q, v = cmdline(qemu[0]), (cmdline(vfsd[0]) if vfsd else None)
    remove(sock, cid)
    base = tempfile.mkdtemp(prefix="kata-bench-floor-")
    shared = os.path.join(base, "shared")
    os.makedirs(os.path.join(shared, "shared"))  # the sandbox's export (mounts/ is not needed)

    def sub(a):
        return (a.replace(f"/run/vc/vm/{cid}", base)
                 .replace(f"/run/kata-containers/shared/sandboxes/{cid}", shared)
                 .replace(f"sandbox-{cid}", "sandbox-bench-floor"))

    q = [sub(a) for a in q]
    v = [sub(a) for a in v] if v else None
    samples, idle_pss = [], 0
    console = os.path.join(base, "console.log")
    try:
        for i in range(n):
            for f in os.listdir(base):
                if f != "shared":
                    os.unlink(os.path.join(base, f))
            vp = None
            if v:
                vp = subprocess.Popen(v, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                sock_path = v[v.index("--socket-path") + 1]
                deadline = time.time() + 10
                while not os.path.exists(sock_path) and time.time() < deadline:
                    time.sleep(0.002)
            t0 = time.perf_counter()
            qp = subprocess.Popen(q, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            took = None
            while time.perf_counter() - t0 < 60 and qp.poll() is None:
                try:
                    with open(console, "rb") as f:
                        if b"kata-agent:" in f.read():
                            took = round((time.perf_counter() - t0) * 1000, 1)
                            break
                except OSError:
                    pass
                time.sleep(0.002)
            if i == 0 and took is not None:
                time.sleep(5)
                idle_pss = pss_kib(qp.pid)
            qp.kill()
            qp.wait()
            if vp:
                vp.kill()
                vp.wait()
            if took is None:
                raise RuntimeError(f"raw QEMU never printed the agent's first line; see {console}")
            samples.append(took)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"ms": summary(samples), "qemu_idle_pss_kib": idle_pss, "argv": q}


# --- the start breakdown from the shim's tracing spans -------------------------------------------

SPAN = re.compile(r"(?P<path>\S+): \S+: close time\.busy=(?P<b>[\d.]+)(?P<bu>ns|µs|ms|s) time\.idle=(?P<i>[\d.]+)(?P<iu>ns|µs|ms|s)")
UNIT_MS = {"ns": 1e-6, "µs": 1e-3, "ms": 1.0, "s": 1000.0}
PHASES = ["config_load", "rootfs_mount", "vm_boot", "accel_choose", "virtiofsd_start", "qemu_start",
          "template_clone", "vmcache_take", "agent_connect", "clone_personalize", "cache_personalize",
          "agent_create_sandbox", "container_create",
          "process_start", "teardown"]


def spans(log_text, ids):
    """{phase: [ms per run]} for the spans of the given task ids (busy + idle = wall time)."""
    out = {p: [] for p in PHASES}
    for m in SPAN.finditer(log_text):
        path = m.group("path")
        ident = re.search(r"\{id=([^}]+)\}", path)
        if not ident or ident.group(1) not in ids:
            continue
        phase = re.sub(r"\{.*?\}", "", path.split(":")[-1])
        if phase in out:
            out[phase].append(round(float(m.group("b")) * UNIT_MS[m.group("bu")] + float(m.group("i")) * UNIT_MS[m.group("iu")], 1))
    return out


CONTAINERD_LOG = "/run/kata-containerd/containerd.log"


def log_size():
    try:
        return os.path.getsize(CONTAINERD_LOG)
    except OSError:
        return 0


def containerd_log_since(offset):
    """What containerd logged after byte `offset` (the shim's log lines end up there)."""
    try:
        with open(CONTAINERD_LOG, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# --- shared-filesystem throughput ----------------------------------------------------------------

# Between the write and the read, the page cache is dropped in the container's kernel (the guest's
# for kata) and, through a handshake over a bind-mounted directory, on the host (virtiofsd and 9p
# read through the host's cache): the read is cold on both sides for every runtime.
FS_SCRIPT = """t() { cut -d' ' -f1 /proc/uptime; }
d=${3:-}
s=$(t); dd if=/dev/zero of=$d/bench.file bs=1M count=$1 conv=fsync 2>/dev/null || exit 1; e=$(t); echo "write $s $e"
sync; echo 3 > /proc/sys/vm/drop_caches || exit 1
touch /sig/guest-dropped; i=0
while [ ! -e /sig/host-dropped ]; do i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep 0.1; done
s=$(t); dd if=$d/bench.file of=/dev/null bs=1M 2>/dev/null || exit 1; e=$(t); echo "read $s $e"
rm -f $d/bench.file; mkdir -p $d/bench.dir; cd $d/bench.dir
s=$(t); i=0; while [ $i -lt $2 ]; do echo x > f$i; i=$((i+1)); done; ls -l > /dev/null; rm -f f*; e=$(t); echo "meta $s $e"
"""


def bench_fs(sock, mib, files, repeats=3):
    """Sequential write/read of a file and create+stat+delete of small files in the rootfs.
    The container is privileged so it can drop the (guest's, for kata) page cache before reading."""
    work = tempfile.mkdtemp(prefix="kata-bench-fs-")
    script = os.path.join(work, "fs.sh")
    with open(script, "w") as f:
        f.write(FS_SCRIPT)
    cfg9p = os.path.join(work, "configuration-9p.toml")
    with open(DEFAULT_CONFIG) as f:
        text = f.read()
    if 'shared_fs = "virtio-fs"' not in text:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no shared_fs = \"virtio-fs\" line to switch")
    with open(cfg9p, "w") as f:
        f.write(text.replace('shared_fs = "virtio-fs"', 'shared_fs = "virtio-9p"'))
    # virtiofsd without its sandbox and seccomp filter (what the runtime ran before), to price
    # the confinement.
    cfg_open = os.path.join(work, "configuration-virtiofsd-unconfined.toml")
    m = re.search(r'^virtio_fs_extra_args = \[(.*)\]$', text, re.M)
    if not m:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no virtio_fs_extra_args line")
    with open(cfg_open, "w") as f:
        f.write(text[:m.start()] + f'virtio_fs_extra_args = [{m.group(1)}, "--sandbox", "none", "--seccomp", "none"]' + text[m.end():])
    cases = [("runc", RUNTIMES["runc"], []), ("kata virtio-fs", RUNTIMES["kata"], []),
             ("kata virtio-fs, virtiofsd unconfined", RUNTIMES["kata"], ["--runtime-config-path", cfg_open]),
             ("kata virtio-9p", RUNTIMES["kata"], ["--runtime-config-path", cfg9p])]
    sig = os.path.join(work, "sig")
    runs = {name: [] for name, _, _ in cases}
    try:
        # Round-robin over the cases, `repeats` times: drift on the host spreads over all of
        # them; each figure is the median of its runs.
        for _ in range(repeats):
            for name, rt, extra in cases:
                runs[name].append(fs_run(sock, name, rt, extra, script, sig, mib, files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {}
    for name, rs in runs.items():
        res[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        res[name]["runs"] = rs
    return {"file_mib": mib, "small_files": files, "repeats": repeats, "results": res}


def fs_run(sock, name, rt, extra, script, sig, mib, files, directory=""):
    """One run of FS_SCRIPT in a privileged container (on `directory`, default the rootfs); its
    figures."""
    shutil.rmtree(sig, ignore_errors=True)
    os.makedirs(sig)
    run = subprocess.Popen(["ctr", "-a", sock, "run", "--rm", "--privileged", "--runtime", rt, *extra,
                            "--mount", f"type=bind,src={script},dst=/fs.sh,options=rbind:ro",
                            "--mount", f"type=bind,src={sig},dst=/sig,options=rbind:rw",
                            IMAGE, "bench-fs", "sh", "/fs.sh", str(mib), str(files), directory],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(sig, "guest-dropped")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
    open(os.path.join(sig, "host-dropped"), "w").close()
    out, err = run.communicate(timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"shared-fs run of {name} failed ({run.returncode}): {err.strip()}")
    r = {}
    for line in out.splitlines():
        k, s, e = line.split()
        r[k + "_ms"] = round((float(e) - float(s)) * 1000)
    r["write_mib_s"] = round(mib / max(r["write_ms"], 10) * 1000, 1)
    r["read_mib_s"] = round(mib / max(r["read_ms"], 10) * 1000, 1)
    return r


def bench_direct_volume(sock, mib, n, repeats=3):
    """A direct volume (an ext4 loop device hot-plugged into the VM) against the same loop device
    mounted on the host and used by a runc container: sequential write and cold read
    (FS_SCRIPT), the QMP hot-plug time from the shim's log, and what the volume adds to
    `ctr run --rm true`."""
    work = tempfile.mkdtemp(prefix="kata-bench-dv-")
    script = os.path.join(work, "fs.sh")
    with open(script, "w") as f:
        f.write(FS_SCRIPT)
    image = os.path.join(work, "vol.img")
    with open(image, "wb") as f:
        f.truncate((2 * mib + 64) << 20)
    sh("mkfs.ext4", "-q", "-F", image)
    dev = sh("losetup", "-f", "--show", image).stdout.strip()
    vol, host_mnt, sig = (os.path.join(work, x) for x in ("vol", "host", "sig"))
    os.makedirs(vol)
    os.makedirs(host_mnt)
    kata_runtime = "/opt/kata/bin/kata-runtime"
    sh(kata_runtime, "direct-volume", "add", "--volume-path", vol, "--mount-info",
       json.dumps({"volume-type": "block", "device": dev, "fstype": "ext4"}))
    with open(DEFAULT_CONFIG) as f:
        text = f.read()
    if 'block_device_driver = "virtio-scsi"' not in text:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no block_device_driver = \"virtio-scsi\" line to switch")
    cfg_blk = os.path.join(work, "configuration-virtio-blk.toml")
    with open(cfg_blk, "w") as f:
        f.write(text.replace('block_device_driver = "virtio-scsi"', 'block_device_driver = "virtio-blk"'))
    host_case, kata_case = DV_HOST, DV_KATA
    runs = {host_case: [], kata_case: [], DV_KATA_BLK: []}
    try:
        log_before = log_size()
        for _ in range(repeats):
            sh("mount", dev, host_mnt)
            try:
                runs[host_case].append(fs_run(sock, host_case, RUNTIMES["runc"],
                                              ["--mount", f"type=bind,src={host_mnt},dst=/vol,options=rbind:rw"],
                                              script, sig, mib, 1, "/vol"))
            finally:
                sh("umount", host_mnt)
            for name, extra in ((kata_case, []), (DV_KATA_BLK, ["--runtime-config-path", cfg_blk])):
                runs[name].append(fs_run(sock, name, RUNTIMES["kata"],
                                         [*extra, "--mount", f"type=bind,src={vol},dst=/vol,options=rbind:rw"],
                                         script, sig, mib, 1, "/vol"))
        with_volume = summary([timed(lambda i=i: ctr(
            sock, "run", "--runtime", RUNTIMES["kata"], "--rm",
            "--mount", f"type=bind,src={vol},dst=/vol,options=rbind:rw",
            IMAGE, f"bench-dv-start-{i}", "true")) for i in range(n)])
        without = summary([timed(lambda i=i: ctr(
            sock, "run", "--runtime", RUNTIMES["kata"], "--rm", IMAGE, f"bench-dv-plain-{i}", "true"))
            for i in range(n)])
        hotplug = [int(x) for x in re.findall(r"direct volume hot-plugged.*?hotplug_ms=(\d+)",
                                               containerd_log_since(log_before))]
    finally:
        sh(kata_runtime, "direct-volume", "remove", "--volume-path", vol, check=False)
        sh("umount", host_mnt, check=False)
        sh("losetup", "-d", dev, check=False)
        shutil.rmtree(work, ignore_errors=True)
    if len(hotplug) != 2 * repeats + n:
        raise RuntimeError(f"expected {2 * repeats + n} hot-plug lines in the shim log, found {len(hotplug)}")
    res = {}
    for name, rs in runs.items():
        res[name] = {k: statistics.median(r[k] for r in rs) for k in ("write_mib_s", "read_mib_s")}
        res[name]["runs"] = rs
    return {"file_mib": mib, "repeats": repeats, "results": res, "hotplug_qmp_ms": summary(hotplug),
            "start_with_volume_ms": with_volume, "start_without_ms": without}


def kernel_release(path):
    """The release from a kernel file's `Linux version ...` banner (ELF vmlinux)."""
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(b"Linux version ")
    return data[at + 14:].split(b" ", 1)[0].decode() if at >= 0 else "unknown"


def machine():
    accel = "unknown"
    try:
        with open("/run/kata-containers/accel-probe.json") as f:
            probe = json.load(f)
        kvm = probe.get("kvm") or {}
        accel = "kvm" if kvm.get("booted") else "tcg"
    except (OSError, ValueError):
        pass
    qemu = sh("/usr/bin/qemu-system-x86_64", "--version", check=False).stdout.splitlines()[:1]
    return {
        "cpus": os.cpu_count(),
        "memory_kib": int(open("/proc/meminfo").readline().split()[1]),
        "host_kernel": os.uname().release,
        "accelerator": accel,
        "qemu": qemu[0] if qemu else "",
        "containerd": sh("containerd", "--version", check=False).stdout.strip(),
        "commit": sh("git", "-C", HERE, "describe", "--always", "--dirty", check=False).stdout.strip() or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def med(xs):
    return statistics.median(xs) if xs else 0


UNCONFINED = "kata virtio-fs, virtiofsd unconfined"
DV_HOST, DV_KATA = "runc, the loop device mounted on the host", "kata, direct volume (virtio-scsi, the default)"
DV_KATA_BLK = "kata, direct volume (virtio-blk)"


# --- seccomp's cost ----------------------------------------------------------------------------

# 200000 one-byte reads and writes: a system-call-heavy loop, timed inside the container.
SYSCALL_LOOP = "t() { cut -d' ' -f1 /proc/uptime; }; s=$(t); dd if=/dev/zero of=/dev/null bs=1 count=100000 2>/dev/null; e=$(t); echo $s $e"


def bench_seccomp(sock, n):
    """`ctr run --rm true` and a system-call loop, without and with containerd's default seccomp
    profile (`ctr run --seccomp`), for runc and kata (the profile applied in the guest)."""
    res = {}
    for rt_name in ("runc", "kata"):
        rt = RUNTIMES[rt_name]
        d = {}
        for mode, extra in (("off", []), ("on", ["--seccomp"])):
            starts = [timed(lambda i=i: ctr(sock, "run", "--runtime", rt, "--rm", *extra, IMAGE,
                                            f"bench-seccomp-{rt_name}-{mode}-{i}", "true")) for i in range(n)]
            loops = []
            for i in range(max(3, n // 3)):
                out = ctr(sock, "run", "--runtime", rt, "--rm", *extra, IMAGE,
                          f"bench-seccomp-loop-{rt_name}-{mode}-{i}", "sh", "-c", SYSCALL_LOOP).stdout.split()
                loops.append(round((float(out[1]) - float(out[0])) * 1000))
            d[mode] = {"start_ms": summary(starts), "loop_ms": summary(loops)}
        res[rt_name] = d
    return res


# --- the VM factory: cold boots against template clones ------------------------------------------

TEMPLATE_PATH = "/run/vc/vm/bench-template"
KATA_RUNTIME = "/opt/kata/bin/kata-runtime"


CACHE_ENDPOINT = "/run/vc/bench-vmcache.sock"


def factory_configs(work, cache_number):
    """(cold, template, vmcache) configurations: the installed one with the initrd and virtio-9p
    (what templating needs), without and with `enable_template`, and with `vm_cache_number`."""
    with open(DEFAULT_CONFIG) as f:
        text = f.read()
    base = set_key(set_key(set_key(text, "image", ""), "initrd", f"{ASSETS}/kata-containers-initrd.img"),
                   "shared_fs", "virtio-9p")
    tpl = set_key(base, "template_path", TEMPLATE_PATH)
    for key, value in (("enable_template", "true"), ("reclaim_guest_freed_memory", "false")):
        tpl = re.sub(rf"^(\s*{key}\s*=\s*).*$", rf"\g<1>{value}", tpl, count=1, flags=re.M)
    cache = base
    for key, value in (("vm_cache_number", str(cache_number)), ("vm_cache_endpoint", f'"{CACHE_ENDPOINT}"')):
        cache = re.sub(rf"^(\s*{key}\s*=\s*).*$", rf"\g<1>{value}", cache, count=1, flags=re.M)
    paths = []
    for name, body in (("cold-9p", base), ("template", tpl), ("vmcache", cache)):
        path = os.path.join(work, f"configuration-{name}.toml")
        with open(path, "w") as f:
            f.write(body)
        paths.append(path)
    return paths


def kata_runtime(cfg, *args):
    return sh(KATA_RUNTIME, "--config", cfg, *args).stdout.strip()


def cached_vm_pids(cfg):
    out = sh(KATA_RUNTIME, "--config", cfg, "factory", "status", check=False).stdout
    return [int(l.split()[3]) for l in out.splitlines() if l.startswith("VM pid = ")]


def wait_cache_full(cfg, number, timeout=300):
    """Waits until the VMCache server holds `number` VMs ready (what VMCache is for: a start
    finds one); returns their QEMU pids."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = cached_vm_pids(cfg)
        if len(pids) >= number:
            return pids
        time.sleep(0.2)
    raise RuntimeError(f"the VMCache server did not hold {number} VMs within {timeout} s")


def bench_vmcache(sock, n, counts, cfg, number):
    """Starts and idle memory with VMs taken from a VMCache server holding `number` VMs (full
    before each start and each memory round), and the cache's own idle cost per cached VM."""
    server_log = open(os.path.join(os.path.dirname(cfg), "vmcache-server.log"), "w")
    sh(KATA_RUNTIME, "--config", cfg, "factory", "destroy", check=False)
    t = time.monotonic()
    server = subprocess.Popen([KATA_RUNTIME, "--config", cfg, "factory", "init"], stdout=server_log,
                              stderr=server_log, env={**os.environ, "KATA_LOG": "info"})
    d = {}
    try:
        pids = wait_cache_full(cfg, number)
        d["fill_ms"] = round((time.monotonic() - t) * 1000)
        time.sleep(5)
        d["cached_vm_pss_kib"] = round(statistics.mean(pss_kib(p) for p in pids))
        samples = []
        log_before = log_size()
        for i in range(n):
            wait_cache_full(cfg, number)
            samples.append(timed(lambda i=i: ctr(sock, "run", "--runtime", RUNTIMES["kata"], *runtime_args(cfg), "--rm",
                                                 IMAGE, f"bench-start-factory-vmcache-{i}", "true")))
        d["start_ms"] = summary(samples)
        ids = {f"bench-start-factory-vmcache-{i}" for i in range(n)}
        d["breakdown_ms"] = spans(containerd_log_since(log_before), ids)
        d["memory"] = {}
        for count in counts:
            wait_cache_full(cfg, number)
            m = bench_memory(sock, [count], [("factory vmcache", RUNTIMES["kata"], cfg)])
            d["memory"][str(count)] = m["factory vmcache"][str(count)]
        d["expected_handed"] = n + sum(counts)
    finally:
        sh(KATA_RUNTIME, "--config", cfg, "factory", "destroy", check=False)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_log.close()
    with open(server_log.name) as f:
        d["handed"] = f.read().count("VM handed over")
    return d


def bench_factory(sock, n, counts, work):
    """Cold boots, template clones and VMs from the VMCache side by side (same guest: initrd,
    virtio-9p): start time and its breakdown, idle memory with 1 and N sandboxes, the template's
    own cost and the cache's."""
    cache_number = max(counts)
    cold, tpl, cache = factory_configs(work, cache_number)
    res = {"template_path": TEMPLATE_PATH, "vm_cache_number": cache_number}
    kata_runtime(tpl, "factory", "destroy")
    t = time.monotonic()
    out = kata_runtime(tpl, "factory", "init")
    res["template_create_ms"] = round((time.monotonic() - t) * 1000)
    if out != "vm factory initialized":
        raise RuntimeError(f"kata-runtime factory init: {out}")
    st = os.statvfs(TEMPLATE_PATH)
    res["template_tmpfs_mib"] = round(st.f_blocks * st.f_frsize / 1048576)
    res["template_used_mib"] = round((st.f_blocks - st.f_bfree) * st.f_frsize / 1048576, 1)
    res["template_state_kib"] = round(os.path.getsize(os.path.join(TEMPLATE_PATH, "state")) / 1024)
    try:
        for name, cfg in (("cold", cold), ("template", tpl)):
            d = {}
            log_before = log_size()
            d["start_ms"] = bench_cold_start(sock, n, f"factory-{name}", RUNTIMES["kata"], cfg)
            ids = {f"bench-start-factory-{name}-{i}" for i in range(n)}
            d["breakdown_ms"] = spans(containerd_log_since(log_before), ids)
            d["memory"] = bench_memory(sock, counts, [(f"factory {name}", RUNTIMES["kata"], cfg)])[f"factory {name}"]
            res[name] = d
    finally:
        kata_runtime(tpl, "factory", "destroy")
    res["vmcache"] = bench_vmcache(sock, n, counts, cache, cache_number)
    return res


def targets(r):
    g = r["guests"]
    kata = r["cold_start_ms"]["kata"]["median"]
    floor = r["floor"]["ms"]["median"]
    # The kernels are compared with the same root (an initrd: Debian's kernel cannot boot the image).
    own_floor = g["kata-rs initrd"]["floor"]["ms"]["median"]
    deb_floor = g["debian initrd"]["floor"]["ms"]["median"]
    n = str(r["concurrent"])
    img, ird = g["kata-rs image"], g["kata-rs initrd"]
    img_pss = img["memory"].get(n, img["memory"]["1"])["mean"]["total_pss_kib"]
    ird_pss = ird["memory"].get(n, ird["memory"]["1"])["mean"]["total_pss_kib"]
    img_start, ird_start = img["cold_start_ms"]["median"], ird["cold_start_ms"]["median"]
    one = r["memory"]["kata"]["1"]["mean"]
    fs = r["fs"]["results"]
    dv = r["direct_volume"]["results"]
    dv_host, dv_kata = dv[DV_HOST], dv[DV_KATA]
    mem = r["guest_memory_mib"]
    fac = r["factory"]
    fc_c, fc_t = fac["cold"]["start_ms"]["median"], fac["template"]["start_ms"]["median"]
    fm_c = fac["cold"]["memory"].get(n, fac["cold"]["memory"]["1"])["mean"]["total_pss_kib"]
    fm_t = fac["template"]["memory"].get(n, fac["template"]["memory"]["1"])["mean"]["total_pss_kib"]
    fc_v = fac["vmcache"]["start_ms"]["median"]
    return [
        ("floor with the built kernel <= 60% of the floor with Debian's (both with an initrd)",
         f"{own_floor:.0f} ms vs {deb_floor:.0f} ms ({own_floor / deb_floor:.0%})", own_floor <= 0.6 * deb_floor),
        (f"rootfs image: >= 30 MiB less host PSS per sandbox than the initrd with {n} sandboxes, cold start <= +10%",
         f"{(ird_pss - img_pss) / 1024:.1f} MiB less ({img_pss / 1024:.1f} vs {ird_pss / 1024:.1f}); "
         f"start {img_start:.0f} vs {ird_start:.0f} ms ({img_start / ird_start - 1:+.0%})",
         ird_pss - img_pss >= 30 * 1024 and img_start <= 1.1 * ird_start),
        ("kata cold start - floor <= 300 ms", f"{kata - floor:.0f} ms ({kata:.0f} - {floor:.0f})", kata - floor <= 300),
        (f"idle QEMU PSS <= 150 MiB (default_memory = {mem})", f"{one['qemu_pss_kib'] / 1024:.1f} MiB", one["qemu_pss_kib"] <= 150 * 1024),
        ("idle sandbox PSS <= 80 MiB", f"{one['total_pss_kib'] / 1024:.1f} MiB", one["total_pss_kib"] <= 80 * 1024),
        ("shim RSS <= 15 MiB", f"{one['shim_rss_kib'] / 1024:.1f} MiB", one["shim_rss_kib"] <= 15 * 1024),
        ("shim /metrics p99 <= 50 ms", f"{r['scrape']['1']['shim_ms']['p99']} ms", r["scrape"]["1"]["shim_ms"]["p99"] <= 50),
        (f"kata-monitor /metrics p99 <= 200 ms with {r['concurrent']} sandboxes",
         f"{r['scrape'][str(r['concurrent'])]['monitor_ms']['p99']} ms" if str(r['concurrent']) in r['scrape'] else "not measured",
         str(r['concurrent']) in r['scrape'] and r['scrape'][str(r['concurrent'])]['monitor_ms']['p99'] <= 200),
        ("kata-monitor RSS <= 20 MiB", f"{max(v['monitor_rss_kib'] for v in r['scrape'].values()) / 1024:.1f} MiB",
         max(v["monitor_rss_kib"] for v in r["scrape"].values()) <= 20 * 1024),
        ("virtio-fs sequential read >= 50% of runc", f"{fs['kata virtio-fs']['read_mib_s']} vs {fs['runc']['read_mib_s']} MiB/s",
         fs["kata virtio-fs"]["read_mib_s"] >= 0.5 * fs["runc"]["read_mib_s"]),
        ("confined virtiofsd >= 90% of unconfined (sequential read and write)",
         f"read {fs['kata virtio-fs']['read_mib_s']} vs {fs[UNCONFINED]['read_mib_s']}, write {fs['kata virtio-fs']['write_mib_s']} vs {fs[UNCONFINED]['write_mib_s']} MiB/s",
         fs["kata virtio-fs"]["read_mib_s"] >= 0.9 * fs[UNCONFINED]["read_mib_s"]
         and fs["kata virtio-fs"]["write_mib_s"] >= 0.9 * fs[UNCONFINED]["write_mib_s"]),
        ("template start median <= 25% of a cold start (same guest: initrd, virtio-9p)",
         f"{fc_t:.0f} vs {fc_c:.0f} ms ({fc_t / fc_c:.0%})", fc_t <= 0.25 * fc_c),
        (f"{n} idle templated sandboxes' total PSS <= 25% of {n} cold ones",
         f"{fm_t * int(n) / 1024:.0f} vs {fm_c * int(n) / 1024:.0f} MiB ({fm_t / fm_c:.0%})", fm_t <= 0.25 * fm_c),
        ("VMCache start median <= 20% of a cold start (same guest: initrd, virtio-9p)",
         f"{fc_v:.0f} vs {fc_c:.0f} ms ({fc_v / fc_c:.0%})", fc_v <= 0.20 * fc_c),
        ("direct volume (default driver) >= 50% of the host's loop device (sequential read and write)",
         f"read {dv_kata['read_mib_s']} vs {dv_host['read_mib_s']}, write {dv_kata['write_mib_s']} vs {dv_host['write_mib_s']} MiB/s",
         dv_kata["read_mib_s"] >= 0.5 * dv_host["read_mib_s"] and dv_kata["write_mib_s"] >= 0.5 * dv_host["write_mib_s"]),
    ]


def generated(r):
    m, s, e, mem, fl, br = r["machine"], r["cold_start_ms"], r["exec_ms"], r["memory"], r["floor"], r["breakdown_ms"]
    kata, floor = s["kata"]["median"], fl["ms"]["median"]
    lines = [
        "<!-- Written by scripts/bench.py (`make bench`); the samples are in bench/results.json. -->",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_kib'] // 1024} MiB, host kernel {m['host_kernel']}, "
        f"accelerator **{m['accelerator']}**, {m['qemu']}, {m['containerd']}; {r['iterations']} iterations, {m['date']}, "
        f"commit `{m['commit']}`.",
        "",
        "![start latency and memory](bench/chart.png)",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for what, measured, ok in targets(r):
        lines.append(f"| {what} | {measured} | {'yes' if ok else '**no**'} |")
    lines += [
        "",
        "## Start and exec latency (ms)",
        "",
        "| what | runtime | min | median | max |",
        "|---|---|---|---|---|",
    ]
    for title, data in (("`ctr run --rm IMAGE true`", s), ("`ctr task exec ... true`", e)):
        for rt in ("runc", "kata"):
            d = data[rt]
            lines.append(f"| {title} | {rt} | {d['min']:.0f} | {d['median']:.0f} | {d['max']:.0f} |")
    f = fl["ms"]
    lines.append(f"| raw QEMU to the agent's first line (the floor) | - | {f['min']:.0f} | {f['median']:.0f} | {f['max']:.0f} |")
    ps = r.get("pod_start")
    if ps:
        lines += [
            "",
            f"## Pod start through the CRI (containerd {ps['containerd']}, {ps.get('iterations', '?')} pods each"
            f"{', ' + ps['date'] if ps.get('date') else ''})",
            "",
            "RunPodSandbox, then CreateContainer + StartContainer of one idle container (ms from RunPodSandbox's "
            "call), as a kubelet drives it (crates/shim/examples/pod_start.rs). `kata`: containerd's default "
            "sandboxer runs a pause container in the VM; `kata-sandbox-api`: `sandboxer = \"shim\"`, containerd "
            "asks the shim for the pod and no pause container runs (docs/containerd.md).",
            "",
            "| handler | what | min | median | max |",
            "|---|---|---|---|---|",
        ]
        for handler in ("kata", "kata-sandbox-api"):
            for key, what in (("run_pod_ms", "RunPodSandbox"), ("pod_ready_ms", "pod with its container running")):
                d = ps[handler][key]
                lines.append(f"| {handler} | {what} | {d['min']:.0f} | {d['median']:.0f} | {d['max']:.0f} |")
    lines += [
        "",
        "## The guest: kernel and root",
        "",
        "Same runtime and configuration except `kernel`, `image` and `initrd`: the project's kernel with the rootfs "
        "image (an NVDIMM the guest runs from with DAX) and with the initrd (unpacked into guest RAM), and Debian's "
        f"generic kernel with its initrd (with modules). The default is **{r['default_guest']}**.",
        "",
        "| guest | release | kernel MiB | floor median ms | cold start median ms | above floor ms | "
        f"QEMU PSS x1 MiB | QEMU PSS x{r['concurrent']} MiB | sandbox PSS x1 MiB | sandbox PSS x{r['concurrent']} MiB | "
        "guest MemTotal MiB | guest MemAvailable MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, k in r["guests"].items():
        mem_k = k["memory"]
        many = mem_k.get(str(r["concurrent"]), mem_k["1"])["mean"]
        lines.append(
            f"| {name} | {k['release']} | {k['kernel_file_bytes'] / 1048576:.1f} | {k['floor']['ms']['median']:.0f} | "
            f"{k['cold_start_ms']['median']:.0f} | {k['cold_start_ms']['median'] - k['floor']['ms']['median']:.0f} | "
            f"{mem_k['1']['mean']['qemu_pss_kib'] / 1024:.1f} | {many['qemu_pss_kib'] / 1024:.1f} | "
            f"{mem_k['1']['mean']['total_pss_kib'] / 1024:.1f} | {many['total_pss_kib'] / 1024:.1f} | "
            f"{k['meminfo']['memtotal_kib'] / 1024:.0f} | {k['meminfo']['memavailable_kib'] / 1024:.0f} |")
    n = str(r["concurrent"])
    own = [name for name in r["guests"] if name.startswith("kata-rs")]
    lines += [
        "",
        f"### Where an idle sandbox's memory goes with {n} at once (host PSS per sandbox, MiB)",
        "",
        "| part | " + " | ".join(own) + " |",
        "|---|" + "---|" * len(own),
    ]
    many = {name: r["guests"][name]["memory"].get(n, r["guests"][name]["memory"]["1"]) for name in own}
    for part in QEMU_PARTS:
        lines.append(f"| QEMU: {part} | " + " | ".join(
            f"{many[name].get('qemu_breakdown_kib', {}).get(part, 0) / 1024:.1f}" for name in own) + " |")
    for key, label in (("shim_pss_kib", "shim"), ("virtiofsd_pss_kib", "virtiofsd"), ("total_pss_kib", "**total**")):
        lines.append(f"| {label} | " + " | ".join(f"{many[name]['mean'][key] / 1024:.1f}" for name in own) + " |")
    lines += [
        "",
        f"Kata's cold start is **{kata - floor:.0f} ms** above the floor (ratio {kata / floor:.2f}); "
        f"the floor's QEMU alone idles at {fl['qemu_idle_pss_kib'] / 1024:.1f} MiB PSS.",
        "",
        "### Where a kata cold start goes (median ms, from the shim's tracing spans)",
        "",
        "| phase | median |",
        "|---|---|",
    ]
    labels = {
        "config_load": "config load (TOML, drop-ins, annotations, validation)",
        "rootfs_mount": "rootfs overlay mount",
        "vm_boot": "VM boot, of which:",
        "accel_choose": "&nbsp;&nbsp;accelerator choice (cached probe)",
        "virtiofsd_start": "&nbsp;&nbsp;virtiofsd start",
        "qemu_start": "&nbsp;&nbsp;QEMU spawn until QMP answers",
        "template_clone": "&nbsp;&nbsp;template clone (QEMU spawn, state load)",
        "clone_personalize": "&nbsp;&nbsp;clone: reseed, clock, NIC hot-plug",
        "vmcache_take": "&nbsp;&nbsp;VMCache: GetBaseVM, take-over (rename, pidfds, QMP)",
        "cache_personalize": "&nbsp;&nbsp;cached VM: clock, NIC hot-plug by descriptor",
        "agent_connect": "&nbsp;&nbsp;kernel boot until the agent answers (a clone's or cached VM's: reconnect)",
        "agent_create_sandbox": "&nbsp;&nbsp;CreateSandbox (shared fs mount)",
        "container_create": "container create (share, CreateContainer)",
        "process_start": "process start (StartContainer)",
        "teardown": "teardown (VM stop, cleanup)",
    }
    top = 0
    for p in PHASES:
        v = med(br.get(p, []))
        if p in ("config_load", "rootfs_mount", "vm_boot", "container_create", "process_start", "teardown"):
            top += v
        lines.append(f"| {labels[p]} | {v:.0f} |")
    lines.append(f"| containerd, ctr and shim start-up (the rest of the median) | {max(kata - top, 0):.0f} |")
    lines += [
        "",
        f"## Idle memory per sandbox (host PSS, MiB; guest default_memory {r['guest_memory_mib']} MiB)",
        "",
        "| runtime | sandboxes at once | shim | QEMU | virtiofsd | total | shim RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for rt in ("runc", "kata"):
        for n, d in mem[rt].items():
            x = d["mean"]
            q = f"{x['qemu_pss_kib'] / 1024:.1f}" if "qemu_pss_kib" in x else ""
            v = f"{x['virtiofsd_pss_kib'] / 1024:.1f}" if "virtiofsd_pss_kib" in x else ""
            lines.append(f"| {rt} | {n} | {x['shim_pss_kib'] / 1024:.1f} | {q} | {v} | {x['total_pss_kib'] / 1024:.1f} | {x['shim_rss_kib'] / 1024:.1f} |")
    fac = r["factory"]
    lines += [
        "",
        "## The VM factory: cold boots, template clones and the VMCache (same guest: initrd, virtio-9p)",
        "",
        f"The template: created in {fac['template_create_ms']} ms by `kata-runtime factory init`; its tmpfs is sized "
        f"{fac['template_tmpfs_mib']} MiB and holds {fac['template_used_mib']} MiB (the pages the template's guest "
        f"touched, shared by every clone), plus a {fac['template_state_kib']} KiB device state.",
        "",
        f"The VMCache: `vm_cache_number = {fac['vm_cache_number']}`, filled in {fac['vmcache']['fill_ms']} ms; each "
        f"cached VM costs {fac['vmcache']['cached_vm_pss_kib'] / 1024:.1f} MiB of host PSS while it waits. Every "
        "start and memory round began with the cache full (a refill is a cold boot in the background).",
        "",
        "| source | start min ms | median | max | sandbox PSS x1 MiB | QEMU PSS x1 | "
        f"sandbox PSS x{r['concurrent']} MiB | QEMU PSS x{r['concurrent']} | total x{r['concurrent']} MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("cold", "template", "vmcache"):
        d = fac[name]
        one_f = d["memory"]["1"]["mean"]
        many_f = d["memory"].get(str(r["concurrent"]), d["memory"]["1"])["mean"]
        st = d["start_ms"]
        lines.append(f"| {name} | {st['min']:.0f} | {st['median']:.0f} | {st['max']:.0f} | "
                     f"{one_f['total_pss_kib'] / 1024:.1f} | {one_f['qemu_pss_kib'] / 1024:.1f} | "
                     f"{many_f['total_pss_kib'] / 1024:.1f} | {many_f['qemu_pss_kib'] / 1024:.1f} | "
                     f"{many_f['total_pss_kib'] * r['concurrent'] / 1024:.0f} |")
    lines += [
        "",
        "| phase (median ms, shim spans) | cold | template | vmcache |",
        "|---|---|---|---|",
    ]
    for p in PHASES:
        c, t, v = (med(fac[k]["breakdown_ms"].get(p, [])) for k in ("cold", "template", "vmcache"))
        if c or t or v:
            lines.append(f"| {labels[p]} | {c:.0f} | {t:.0f} | {v:.0f} |")
    lines += [
        "",
        "## Metrics scrapes (ms; shim: its monitor socket's /metrics; kata-monitor: /metrics of all sandboxes)",
        "",
        "| sandboxes | shim median | shim p99 | kata-monitor median | kata-monitor p99 | kata-monitor RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for n, d in r["scrape"].items():
        lines.append(f"| {n} | {d['shim_ms']['median']} | {d['shim_ms']['p99']} | {d['monitor_ms']['median']} | "
                     f"{d['monitor_ms']['p99']} | {d['monitor_rss_kib'] / 1024:.1f} |")
    fs = r["fs"]
    lines += [
        "",
        f"## Shared filesystem ({fs['file_mib']} MiB file, {fs['small_files']} small files, in the container's rootfs; median of {fs.get('repeats', 1)} runs)",
        "",
        "| runtime | write MiB/s | read MiB/s (page cache dropped in the container's kernel and on the host) | create+stat+delete (ms) |",
        "|---|---|---|---|",
    ]
    for name, d in fs["results"].items():
        lines.append(f"| {name} | {d['write_mib_s']} | {d['read_mib_s']} | {d['meta_ms']} |")
    dv = r["direct_volume"]
    lines += [
        "",
        f"## Direct volume ({dv['file_mib']} MiB file on an ext4 loop device; median of {dv['repeats']} runs)",
        "",
        "| where | write MiB/s | read MiB/s (page cache dropped in the container's kernel and on the host) |",
        "|---|---|---|",
    ]
    for name, d in dv["results"].items():
        lines.append(f"| {name} | {d['write_mib_s']} | {d['read_mib_s']} |")
    lines += [
        "",
        f"Hot-plug (QMP `blockdev-add` + `device_add`, in the shim): median {dv['hotplug_qmp_ms']['median']} ms "
        f"(max {dv['hotplug_qmp_ms']['max']} ms). `ctr run --rm true` with the volume: median "
        f"{dv['start_with_volume_ms']['median']:.0f} ms, without: {dv['start_without_ms']['median']:.0f} ms "
        f"(the volume adds {dv['start_with_volume_ms']['median'] - dv['start_without_ms']['median']:.0f} ms: "
        "hot-plug, the guest finding the disk, mount, unmount and unplug).",
    ]
    sc = r["seccomp"]
    lines += [
        "",
        "## seccomp's cost (containerd's default profile, `ctr run --seccomp`; median ms)",
        "",
        "| runtime | `ctr run --rm true` without | with | 200000 read/write system calls without | with |",
        "|---|---|---|---|---|",
    ]
    for rt, d in sc.items():
        lines.append(f"| {rt} | {d['off']['start_ms']['median']:.0f} | {d['on']['start_ms']['median']:.0f} | "
                     f"{d['off']['loop_ms']['median']:.0f} | {d['on']['loop_ms']['median']:.0f} |")
    lines.append("")
    return "\n".join(lines)


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_markdown(path, r):
    """Replaces the generated part of `path` (between the bench markers), keeping the prose."""
    body = f"{BEGIN}\n{generated(r)}\n{END}"
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        old = ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + body + old[old.index(END) + len(END):]
    else:
        new = "# Benchmarks\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(new)


def chart(path, r):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    s, fl, deb = r["cold_start_ms"], r["floor"]["ms"], r["guests"]["debian initrd"]
    names = ["runc", "floor", "kata", "floor\n(Debian kernel)", "kata\n(Debian kernel)"]
    data = [s["runc"], fl, s["kata"], deb["floor"]["ms"], deb["cold_start_ms"]]
    meds = [d["median"] for d in data]
    errs = [[d["median"] - d["min"] for d in data], [d["max"] - d["median"] for d in data]]
    a.bar(names, meds, yerr=errs, capsize=5, color=["#888888", "#c9a227", "#2b6cb0", "#e0c96a", "#90b4e0"])
    a.tick_params(axis="x", labelsize=8)
    a.set_ylabel("ms (median, min-max)")
    a.set_title("Cold start: ctr run --rm IMAGE true")
    for i, v in enumerate(meds):
        a.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    mem = r["memory"]
    labels, parts = [], {"shim": [], "QEMU": [], "virtiofsd": []}
    for rt in ("runc", "kata"):
        for n, d in mem[rt].items():
            labels.append(f"{rt} x{n}")
            x = d["mean"]
            parts["shim"].append(x["shim_pss_kib"] / 1024)
            parts["QEMU"].append(x.get("qemu_pss_kib", 0) / 1024)
            parts["virtiofsd"].append(x.get("virtiofsd_pss_kib", 0) / 1024)
    bottom = [0.0] * len(labels)
    for (k, vals), c in zip(parts.items(), ["#888888", "#2b6cb0", "#38a169"]):
        b.bar(labels, vals, bottom=bottom, label=k, color=c)
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.axhline(80, color="red", linestyle="--", linewidth=1, label="target 80 MiB")
    b.set_ylabel("MiB PSS per sandbox (idle)")
    b.set_title("Memory per sandbox (1 and N at once)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--concurrent", type=int, default=10, help="sandboxes at once for the memory figure")
    p.add_argument("--fs-mib", type=int, default=256, help="size of the sequential file")
    p.add_argument("--files", type=int, default=2000, help="small files for the metadata workload")
    p.add_argument("--out", default=os.path.join(HERE, "bench", "results.json"))
    p.add_argument("--markdown", default=os.path.join(HERE, "BENCHMARKS.md"))
    p.add_argument("--chart", default=os.path.join(HERE, "bench", "chart.png"))
    p.add_argument("--only", choices=["pod_start"],
                   help="run this part only and update it in --out (the rest is kept as measured)")
    a = p.parse_args()
    if a.iterations < 1 or a.concurrent < 1 or a.fs_mib < 1 or a.files < 1:
        p.error("--iterations, --concurrent, --fs-mib and --files must be at least 1")
    if a.only:
        with open(a.out) as f:
            r = json.load(f)
        r[a.only] = bench_pod_start(a.iterations)
        r[a.only]["iterations"] = a.iterations
        r[a.only]["date"] = machine()["date"]
        r["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(r)]
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
            f.write("\n")
        write_markdown(a.markdown, r)
        print(generated(r))
        return 0
    sock = sh(os.path.join(HERE, "scripts", "containerd.sh"), "start").stdout.strip()
    tar = "/tmp/kata-bench-busybox.tar"
    sh(os.path.join(HERE, "scripts", "busybox-image.sh"), tar, IMAGE)
    ctr(sock, "images", "import", tar)
    r = {"iterations": a.iterations, "concurrent": a.concurrent, "machine": machine()}
    with open(DEFAULT_CONFIG) as f:
        r["guest_memory_mib"] = int(config_value(f.read(), "default_memory"))
    work = tempfile.mkdtemp(prefix="kata-bench-")
    counts = [1, a.concurrent] if a.concurrent > 1 else [1]
    try:
        guests = guest_configs(work)
        r["cold_start_ms"] = {"runc": bench_cold_start(sock, a.iterations, "runc", RUNTIMES["runc"])}
        r["guests"] = {}
        for name, (cfg, kernel, root) in guests.items():
            if cfg is None:
                r["default_guest"] = name
            k = {"kernel": kernel, "kernel_file_bytes": os.path.getsize(kernel), "release": kernel_release(kernel),
                 "root": root}
            log_before = log_size()
            tag = name.replace(" ", "-")
            k["cold_start_ms"] = bench_cold_start(sock, a.iterations, f"kata-{tag}", RUNTIMES["kata"], cfg)
            ids = {f"bench-start-kata-{tag}-{i}" for i in range(a.iterations)}
            k["breakdown_ms"] = spans(containerd_log_since(log_before), ids)
            k["floor"] = bench_floor(sock, a.iterations, cfg)
            k["memory"] = bench_memory(sock, counts, [(f"kata {name}", RUNTIMES["kata"], cfg)])[f"kata {name}"]
            k["meminfo"] = guest_meminfo(sock, cfg)
            r["guests"][name] = k
    finally:
        shutil.rmtree(work, ignore_errors=True)
    default = r["guests"][r["default_guest"]]
    r["cold_start_ms"]["kata"] = default["cold_start_ms"]
    r["breakdown_ms"] = default["breakdown_ms"]
    r["floor"] = default["floor"]
    r["exec_ms"] = bench_exec(sock, a.iterations)
    r["memory"] = bench_memory(sock, counts, [("runc", RUNTIMES["runc"], None)])
    r["memory"]["kata"] = default["memory"]
    r["fs"] = bench_fs(sock, a.fs_mib, a.files)
    r["direct_volume"] = bench_direct_volume(sock, a.fs_mib, a.iterations)
    r["seccomp"] = bench_seccomp(sock, a.iterations)
    r["scrape"] = bench_scrape(sock, counts)
    r["pod_start"] = bench_pod_start(a.iterations)
    r["pod_start"]["iterations"] = a.iterations
    work = tempfile.mkdtemp(prefix="kata-bench-")
    try:
        r["factory"] = bench_factory(sock, a.iterations, counts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(r)]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    write_markdown(a.markdown, r)
    chart(a.chart, r)
    print(generated(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
