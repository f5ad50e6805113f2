"""What a seccomp profile costs, kata and runc."""

from .config import IMAGE, RUNTIMES
from .host import ctr, summary, timed


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
