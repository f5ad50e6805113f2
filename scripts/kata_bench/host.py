"""Host-side measurement primitives: commands, `ctr`, processes and their memory (PSS, RSS, the QEMU breakdown), timing and statistics, the shim's tracing spans in containerd's log, the machine."""
import datetime
import json
import os
import re
import statistics
import subprocess
import time

from .config import HERE


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


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 1)


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


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
