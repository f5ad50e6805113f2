"""Idle host memory of 1 and N sandboxes, and the guest's own view of its memory."""
import statistics
import time

from .config import IMAGE, RUNTIMES, runtime_args
from .host import QEMU_PARTS, ctr, pss_kib, qemu_breakdown_kib, rss_kib, sandbox_pids
from .starts import remove, start_detached


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
