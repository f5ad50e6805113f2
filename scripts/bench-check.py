#!/usr/bin/python3
"""Checks that a bench run (scripts/bench.py) measured real figures: every section present and
positive, the breakdown taken from the shim's spans, and a PNG chart written.

    scripts/bench-check.py RESULTS.json CHART.png
"""
import json
import sys


def check(r, png):
    errors = []

    def need(cond, what):
        if not cond:
            errors.append(what)

    for rt in ("runc", "kata"):
        need(r["cold_start_ms"][rt]["median"] > 0, f"cold start of {rt}")
        need(r["exec_ms"][rt]["median"] > 0, f"exec latency of {rt}")
        need(r["memory"][rt]["1"]["mean"]["shim_pss_kib"] > 0, f"shim PSS of {rt}")
    k = r["memory"]["kata"]["1"]["mean"]
    need(k["qemu_pss_kib"] > 0 and k["virtiofsd_pss_kib"] > 0, "QEMU and virtiofsd PSS")
    need(len(r["memory"]["kata"]) >= 2, "memory of concurrent sandboxes")
    need(r["floor"]["ms"]["median"] > 0 and r["floor"]["qemu_idle_pss_kib"] > 0, "the raw-QEMU floor")
    # The floor (QEMU spawn to the agent's first line) is a part of kata's cold start: a floor
    # above kata's start is a broken measurement, for every guest.
    need(r.get("default_guest") in r.get("guests", {}), "the default guest's figures")
    for name in ("kata-rs image", "kata-rs initrd", "debian initrd"):
        k = r["guests"].get(name)
        need(k is not None, f"the {name} kernel's figures")
        if k is None:
            continue
        need(k["floor"]["ms"]["median"] > 0, f"the raw-QEMU floor of the {name} kernel")
        need(k["floor"]["ms"]["median"] <= k["cold_start_ms"]["median"], f"the {name} kernel's floor at most its cold start")
        need(k["memory"]["1"]["mean"]["qemu_pss_kib"] > 0, f"QEMU PSS with the {name} kernel")
        need(len(k["memory"]) >= 2, f"memory of concurrent sandboxes with the {name} guest")
        need(k["meminfo"]["memtotal_kib"] > 0 and k["meminfo"]["memavailable_kib"] > 0, f"guest meminfo with the {name} kernel")
        need(k["kernel_file_bytes"] > 0, f"the {name} kernel's file size")
    for phase in ("config_load", "vm_boot", "agent_connect", "container_create", "process_start", "teardown"):
        need(len(r["breakdown_ms"].get(phase, [])) == r["iterations"], f"span {phase} once per kata start")
    for case in ("runc", "kata virtio-fs", "kata virtio-fs, virtiofsd unconfined", "kata virtio-9p"):
        d = r["fs"]["results"].get(case, {})
        need(all(d.get(x, 0) > 0 for x in ("write_mib_s", "read_mib_s", "meta_ms")), f"shared-fs figures of {case}")
    dv = r.get("direct_volume", {})
    for case, d in dv.get("results", {}).items():
        need(d.get("write_mib_s", 0) > 0 and d.get("read_mib_s", 0) > 0, f"direct-volume figures of {case}")
    need(len(dv.get("results", {})) == 3, "direct volume (virtio-scsi, virtio-blk) and host figures")
    need(dv.get("hotplug_qmp_ms", {}).get("max", 0) > 0, "the direct volume's hot-plug time")
    need(dv.get("start_with_volume_ms", {}).get("median", 0) > 0 and dv.get("start_without_ms", {}).get("median", 0) > 0,
         "starts with and without a direct volume")
    need(len(r["targets"]) == 19, "the nineteen targets")
    qf = r.get("qemu_floor", {})
    need(qf.get("ms", {}).get("median", 0) > 0 and qf.get("qemu_idle_pss_kib", 0) > 0, "QEMU's own floor")
    # QEMU's own floor boots less than the runtime's command line: above the replay it is broken.
    need(0 < qf.get("ms", {}).get("median", 0) <= r["floor"]["ms"]["median"], "QEMU's own floor at most the replay")
    bis = r.get("floor_bisect", [])
    need(len(bis) == 13 and bis[0].get("ms", {}).get("median", 0) > 0,
         "the bisection of the runtime's command line (the line as is and twelve options)")
    need(all(b.get("ms", {}).get("median", 0) > 0 or (b.get("needed") and b.get("why")) for b in bis),
         "each option's boot time, or why the guest needs it")
    den = r.get("density", {})
    need(den.get("count", 0) > 0 and len(den.get("start_ms", [])) == den.get("count")
         and min(den.get("start_ms", [0])) > 0, "density: a start time per sandbox")
    need(den.get("total_pss_kib", 0) > 0 and den.get("idle_cpu_pct_of_one_core", -1) >= 0,
         "density: the idle sandboxes' PSS and CPU")
    need("left" in den, "density: what was left after removing them")
    by = den.get("idle_cpu_pct_by_process", {})
    need(set(by) == {"qemu", "shim", "virtiofsd"}
         and abs(sum(by.values()) - den.get("idle_cpu_pct_of_one_core", -1)) < 0.5,
         "density: the idle CPU split by process (QEMU, shims, virtiofsd)")
    fac = r.get("factory", {})
    need(fac.get("template_create_ms", 0) > 0 and fac.get("template_used_mib", 0) > 0
         and fac.get("template_state_kib", 0) > 0, "the VM template's own cost")
    for source in ("cold", "template", "vmcache"):
        d = fac.get(source, {})
        need(d.get("start_ms", {}).get("median", 0) > 0, f"{source} start times")
        need(d.get("memory", {}).get("1", {}).get("mean", {}).get("qemu_pss_kib", 0) > 0, f"{source} QEMU PSS")
        need(len(d.get("memory", {})) >= 2, f"{source} memory with concurrent sandboxes")
    need(len(fac.get("template", {}).get("breakdown_ms", {}).get("clone_personalize", [])) == r["iterations"],
         "span clone_personalize once per templated start (every start was a clone)")
    vc = fac.get("vmcache", {})
    need(len(vc.get("breakdown_ms", {}).get("cache_personalize", [])) == r["iterations"],
         "span cache_personalize once per VMCache start (every start took a cached VM)")
    need(vc.get("handed", -1) == vc.get("expected_handed", -2),
         "every VMCache start and memory-round sandbox took a cached VM (the server's log)")
    need(vc.get("fill_ms", 0) > 0 and vc.get("cached_vm_pss_kib", 0) > 0, "the VMCache's own cost")
    for rt in ("runc", "kata"):
        for mode in ("off", "on"):
            d = r.get("seccomp", {}).get(rt, {}).get(mode, {})
            need(d.get("start_ms", {}).get("median", 0) > 0 and d.get("loop_ms", {}).get("median", 0) > 0,
                 f"seccomp figures of {rt} ({mode})")
    for n, d in r.get("scrape", {}).items():
        need(d["shim_ms"]["median"] > 0 and d["monitor_ms"]["median"] > 0 and d["monitor_rss_kib"] > 0, f"scrape figures with {n} sandboxes")
    need(len(r.get("scrape", {})) >= 2, "scrapes with 1 and N sandboxes")
    ps = r.get("pod_start", {})
    for handler in ("kata", "kata-sandbox-api"):
        for key in ("run_pod_ms", "pod_ready_ms"):
            d = ps.get(handler, {}).get(key, {})
            need(len(d.get("samples", [])) == ps.get("iterations") and d.get("min", 0) > 0,
                 f"CRI pod start ({key}) with handler {handler}, once per iteration")
        d = ps.get(handler, {})
        need(d.get("run_pod_ms", {}).get("median", 1) <= d.get("pod_ready_ms", {}).get("median", 0),
             f"{handler}: RunPodSandbox at most the pod's readiness")
    cs = r.get("cri_streaming", {})
    for rt in ("runc", "kata"):
        for key in ("exec_ms", "port_forward_mib_s", "configmap_ms"):
            d = cs.get(rt, {}).get(key, {})
            need(len(d.get("samples", [])) == cs.get("iterations") and d.get("min", 0) > 0,
                 f"CRI {key} of {rt}, once per iteration")
    need(r.get("guest_memory_mib", 0) > 0, "the guest memory from the configuration")
    with open(png, "rb") as f:
        need(f.read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is a PNG")
    return errors


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        r = json.load(f)
    errors = check(r, sys.argv[2])
    for e in errors:
        print(f"bench-check: missing or not positive: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
