"""The VM factory: cold boots against template clones and VMs from the VMCache."""
import os
import statistics
import subprocess
import time

from .config import IMAGE, KATA_RUNTIME, RUNTIMES, TEMPLATE_PATH, factory_configs, runtime_args
from .host import containerd_log_since, ctr, log_size, pss_kib, sh, spans, summary, timed
from .memory import bench_memory
from .starts import bench_cold_start


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
