#!/usr/bin/env python3
"""Benchmarks kata against runc on this machine (see BENCHMARKS.md).

Measures, with the real containerd: cold start (`ctr run --rm IMAGE true`), exec latency
(`ctr task exec ... true`) and the idle host memory (PSS) of a sandbox. Writes every sample to a
JSON file and the tables to a Markdown file.

    scripts/bench.py [--iterations N] [--out bench/results.json] [--markdown BENCHMARKS.md]
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "kata.local/busybox:latest"
RUNTIMES = {"runc": "io.containerd.runc.v2", "kata": "io.containerd.kata.v2"}


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


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


def start_detached(sock, rt, cid):
    remove(sock, cid)
    ctr(sock, "run", "-d", "--runtime", rt, IMAGE, cid, "sleep", "1000")
    wait_running(sock, cid)


def remove(sock, cid):
    if cid in ctr(sock, "task", "ls", "-q").stdout.split():
        ctr(sock, "task", "kill", "-s", "SIGKILL", cid, check=False)
        deadline = time.time() + 30
        while ctr(sock, "task", "rm", cid, check=False).returncode != 0 and time.time() < deadline:
            time.sleep(0.2)
    if cid in ctr(sock, "container", "ls", "-q").stdout.split():
        ctr(sock, "container", "rm", cid, check=False)


def bench_cold_start(sock, n):
    res = {}
    for name, rt in RUNTIMES.items():
        samples = [timed(lambda i=i: ctr(sock, "run", "--runtime", rt, "--rm", IMAGE, f"bench-start-{name}-{i}", "true")) for i in range(n)]
        res[name] = summary(samples)
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


def bench_memory(sock):
    res = {}
    for name, rt in RUNTIMES.items():
        cid = f"bench-mem-{name}"
        start_detached(sock, rt, cid)
        time.sleep(3)
        shim = pids_matching(lambda c: "containerd-shim" in c and f" -id {cid} " in f" {c} ")
        entry = {"shim_pss_kib": sum(pss_kib(p) for p in shim)}
        if name == "kata":
            entry["qemu_pss_kib"] = sum(pss_kib(p) for p in pids_matching(lambda c: f"-name sandbox-{cid} " in c))
            entry["virtiofsd_pss_kib"] = sum(pss_kib(p) for p in pids_matching(lambda c: c.startswith("/opt/kata/libexec/virtiofsd") and f"/run/vc/vm/{cid}/" in c))
        entry["total_pss_kib"] = sum(v for k, v in entry.items() if k.endswith("_pss_kib"))
        res[name] = entry
        remove(sock, cid)
    return res


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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(r):
    m, s, e, mem = r["machine"], r["cold_start_ms"], r["exec_ms"], r["memory"]
    k = mem["kata"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by scripts/bench.py (`make bench`); the samples are in bench/results.json. -->",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_kib'] // 1024} MiB, host kernel {m['host_kernel']}, "
        f"accelerator **{m['accelerator']}**, {m['qemu']}, {m['containerd']}; {r['iterations']} iterations, {m['date']}.",
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
    lines += [
        "",
        "## Idle memory of one sandbox (host PSS, MiB)",
        "",
        "| runtime | shim | QEMU | virtiofsd | total |",
        "|---|---|---|---|---|",
        f"| runc | {mem['runc']['shim_pss_kib'] / 1024:.1f} | | | {mem['runc']['total_pss_kib'] / 1024:.1f} |",
        f"| kata | {k['shim_pss_kib'] / 1024:.1f} | {k.get('qemu_pss_kib', 0) / 1024:.1f} | {k.get('virtiofsd_pss_kib', 0) / 1024:.1f} | {k['total_pss_kib'] / 1024:.1f} |",
        "",
        "The guest has the default 2048 MiB. Not measured yet (issue 5): the raw-QEMU floor, the boot",
        "breakdown from tracing spans, 10 concurrent sandboxes, shared-filesystem throughput, a chart.",
        "",
    ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--out", default=os.path.join(HERE, "bench", "results.json"))
    p.add_argument("--markdown", default=os.path.join(HERE, "BENCHMARKS.md"))
    a = p.parse_args()
    if a.iterations < 1:
        p.error("--iterations must be at least 1")
    sock = sh(os.path.join(HERE, "scripts", "containerd.sh"), "start").stdout.strip()
    tar = "/tmp/kata-bench-busybox.tar"
    sh(os.path.join(HERE, "scripts", "busybox-image.sh"), tar, IMAGE)
    ctr(sock, "images", "import", tar)
    r = {"iterations": a.iterations, "machine": machine()}
    r["cold_start_ms"] = bench_cold_start(sock, a.iterations)
    r["exec_ms"] = bench_exec(sock, a.iterations)
    r["memory"] = bench_memory(sock)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    with open(a.markdown, "w") as f:
        f.write(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
