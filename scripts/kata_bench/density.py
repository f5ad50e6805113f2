"""Density: N sandboxes started one after another and kept idle on this host; the start latency of
each, the host CPU the idle sandboxes use together, their total PSS, and nothing left after
they are removed."""
import os
import time

from .config import IMAGE, RUNTIMES
from .host import ctr, pids_matching, pss_kib, sandbox_pids, timed
from .starts import remove, wait_running

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    """utime + stime of a process and its threads, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def leftovers(prefix):
    """What a removed sandbox could leave on the host: processes, VM and share directories."""
    procs = pids_matching(lambda c: f"sandbox-{prefix}" in c or (" -id " + prefix) in c)
    dirs = [d for root in ("/run/vc/vm", "/run/kata-containers/shared/sandboxes")
            if os.path.isdir(root) for d in os.listdir(root) if d.startswith(prefix)]
    return {"processes": procs, "directories": dirs}


def bench_density(sock, count, idle_s=30):
    prefix = "bench-density-"
    ids = [f"{prefix}{i}" for i in range(count)]
    for cid in ids:
        remove(sock, cid)
    starts = []
    parts = {"shim": [], "qemu": [], "virtiofsd": []}
    try:
        for cid in ids:
            def start(cid=cid):
                ctr(sock, "run", "-d", "--runtime", RUNTIMES["kata"], IMAGE, cid, "sleep", "100000")
                wait_running(sock, cid)
            starts.append(timed(start))
            for part, found in zip(parts, sandbox_pids(cid)):
                parts[part].extend(found)
        pids = [p for found in parts.values() for p in found]
        time.sleep(10)  # the last guests finish booting their services
        t0 = time.monotonic()
        before = {part: sum(cpu_ticks(p) for p in found) for part, found in parts.items()}
        time.sleep(idle_s)
        elapsed = time.monotonic() - t0
        # Which process the idle CPU goes to: the guest (QEMU), the shim or virtiofsd.
        cpu_by_part = {
            part: round(100 * (sum(cpu_ticks(p) for p in found) - before[part]) / CLK_TCK
                        / elapsed, 1)
            for part, found in parts.items()
        }
        cpu_pct = round(sum(cpu_by_part.values()), 1)
        pss = sum(pss_kib(p) for p in pids)
    finally:
        t = time.perf_counter()
        for cid in ids:
            remove(sock, cid)
        removed_s = round(time.perf_counter() - t, 1)
    time.sleep(2)
    return {
        "count": count,
        "start_ms": starts,
        "first_ms": starts[0],
        "last_ms": starts[-1],
        "idle_seconds": idle_s,
        "idle_cpu_pct_of_one_core": cpu_pct,
        "idle_cpu_pct_by_process": cpu_by_part,
        "total_pss_kib": pss,
        "removed_in_s": removed_s,
        "left": leftovers(prefix),
    }
