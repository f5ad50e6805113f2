"""`scripts/bench.py`: runs every measurement (or one, `--only`) and writes the results, BENCHMARKS.md and the chart."""
import argparse
import json
import os
import shutil
import tempfile

from .config import HERE, IMAGE, RUNTIMES, guest_configs, guest_memory_mib
from .factory import bench_factory
from .host import containerd_log_since, ctr, kernel_release, log_size, machine, sh, spans
from .memory import bench_memory, guest_meminfo
from .metrics import bench_scrape
from .report import chart, generated, targets, write_markdown
from .seccomp import bench_seccomp
from .starts import bench_cold_start, bench_cri_streaming, bench_exec, bench_floor, bench_pod_start
from .density import bench_density
from .floors import qemu_floor
from .storage import bench_direct_volume, bench_fs


DESCRIPTION = """Benchmarks kata against runc on this machine (see BENCHMARKS.md).

Measures, with the real containerd, kata against runc: cold start (`ctr run --rm IMAGE true`)
with its breakdown from the shim's tracing spans, the raw-QEMU floor (the sandbox's own QEMU
command line replayed to the agent's first console line), QEMU's own floor (a minimal machine
booting a busybox init) and what each option of the runtime's QEMU command line costs, exec latency, the pod start through
the CRI, exec, port-forward and ConfigMap updates through the CRI, idle host memory (PSS) of 1 and N sandboxes at once, the metrics path, shared-filesystem
and direct-volume throughput, seccomp's cost, the VM factory and density (N sandboxes started
one after another and kept idle). Writes every sample to a JSON
file, the tables into a Markdown file (between its bench markers) and a PNG chart.

    scripts/bench.py [--iterations N] [--concurrent N] [--fs-mib N] [--files N]
                     [--bisect-iterations N] [--density N]
                     [--only pod_start|cri_streaming|floors|density|factory]
                     [--out bench/results.json] [--markdown BENCHMARKS.md] [--chart bench/chart.png]
"""


def floor_accel():
    """The accelerator QEMU's own floor boots with: the one the runtime uses on this machine (KVM
    where it boots the guest, else TCG), so the floor and kata are compared like with like."""
    return "kvm" if machine()["accelerator"] == "kvm" else "tcg"


def only_floors(a, sock):
    """QEMU's own floor, the replay of the default guest's command line and its bisection."""
    fl = bench_floor(sock, a.iterations, None, a.bisect_iterations)
    return {"qemu_floor": qemu_floor(a.iterations, floor_accel()), "floor_bisect": fl.pop("bisect"),
            "bisect_iterations": a.bisect_iterations, "floor": fl}


def sandbox_counts(a):
    """The numbers of sandboxes at once the memory figures are taken with."""
    return [1, a.concurrent] if a.concurrent > 1 else [1]


def only_factory(a, sock):
    """The VM factory: cold boots, template clones and VMCache VMs with the same guest."""
    counts = sandbox_counts(a)
    work = tempfile.mkdtemp(prefix="kata-bench-")
    try:
        return {"factory": bench_factory(sock, a.iterations, counts, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# The parts `--only` can run alone: each gives the keys of the results it replaces.
ONLY = {
    "pod_start": lambda a, sock: {"pod_start": dict(bench_pod_start(a.iterations), iterations=a.iterations)},
    "cri_streaming": lambda a, sock: {"cri_streaming": dict(bench_cri_streaming(a.iterations), iterations=a.iterations)},
    "floors": only_floors,
    "density": lambda a, sock: {"density": bench_density(sock, a.density)},
    "factory": only_factory,
}


def main():
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--concurrent", type=int, default=10, help="sandboxes at once for the memory figure")
    p.add_argument("--fs-mib", type=int, default=256, help="size of the sequential file")
    p.add_argument("--files", type=int, default=2000, help="small files for the metadata workload")
    p.add_argument("--out", default=os.path.join(HERE, "bench", "results.json"))
    p.add_argument("--markdown", default=os.path.join(HERE, "BENCHMARKS.md"))
    p.add_argument("--chart", default=os.path.join(HERE, "bench", "chart.png"))
    p.add_argument("--bisect-iterations", type=int, default=5,
                   help="boots per option when bisecting the runtime's QEMU command line")
    p.add_argument("--density", type=int, default=50, help="sandboxes started and kept idle for the density figures")
    p.add_argument("--only", choices=list(ONLY),
                   help="run this part only and update it in --out (the rest is kept as measured)")
    a = p.parse_args()
    if min(a.iterations, a.concurrent, a.fs_mib, a.files, a.bisect_iterations, a.density) < 1:
        p.error("--iterations, --concurrent, --fs-mib, --files, --bisect-iterations and --density must be at least 1")
    if a.only:
        with open(a.out) as f:
            r = json.load(f)
        sock = None
        if a.only in ("floors", "density", "factory"):
            sock = sh(os.path.join(HERE, "scripts", "containerd.sh"), "start").stdout.strip()
            tar = "/tmp/kata-bench-busybox.tar"
            sh(os.path.join(HERE, "scripts", "busybox-image.sh"), tar, IMAGE)
            ctr(sock, "images", "import", tar)
        for key, value in ONLY[a.only](a, sock).items():
            if isinstance(value, dict):
                value["date"] = machine()["date"]
            r[key] = value
        if a.only == "floors":
            r["guests"][r["default_guest"]]["floor"] = r["floor"]
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
    r["guest_memory_mib"] = guest_memory_mib()
    work = tempfile.mkdtemp(prefix="kata-bench-")
    counts = sandbox_counts(a)
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
            k["floor"] = bench_floor(sock, a.iterations, cfg, a.bisect_iterations if cfg is None else 0)
            k["memory"] = bench_memory(sock, counts, [(f"kata {name}", RUNTIMES["kata"], cfg)])[f"kata {name}"]
            k["meminfo"] = guest_meminfo(sock, cfg)
            r["guests"][name] = k
    finally:
        shutil.rmtree(work, ignore_errors=True)
    default = r["guests"][r["default_guest"]]
    r["cold_start_ms"]["kata"] = default["cold_start_ms"]
    r["breakdown_ms"] = default["breakdown_ms"]
    r["floor"] = default["floor"]
    r["floor_bisect"] = r["floor"].pop("bisect")
    r["bisect_iterations"] = a.bisect_iterations
    r["qemu_floor"] = qemu_floor(a.iterations, floor_accel())
    r["exec_ms"] = bench_exec(sock, a.iterations)
    r["memory"] = bench_memory(sock, counts, [("runc", RUNTIMES["runc"], None)])
    r["memory"]["kata"] = default["memory"]
    r["fs"] = bench_fs(sock, a.fs_mib, a.files)
    r["direct_volume"] = bench_direct_volume(sock, a.fs_mib, a.iterations)
    r["seccomp"] = bench_seccomp(sock, a.iterations)
    r["scrape"] = bench_scrape(sock, counts)
    r["pod_start"] = bench_pod_start(a.iterations)
    r["pod_start"]["iterations"] = a.iterations
    r["cri_streaming"] = bench_cri_streaming(a.iterations)
    r["cri_streaming"]["iterations"] = a.iterations
    r.update(only_factory(a, sock))
    r["density"] = bench_density(sock, a.density)
    r["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(r)]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    write_markdown(a.markdown, r)
    chart(a.chart, r)
    print(generated(r))
    return 0
