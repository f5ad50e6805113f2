"""The report: the targets, BENCHMARKS.md's generated part, the chart."""

from .host import PHASES, QEMU_PARTS, med
from .storage import DV_HOST, DV_KATA, UNCONFINED


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def density_targets(den):
    if not den:
        return [("density (--density N sandboxes kept idle)", "not measured", False)]
    ds, dn = den["start_ms"], den["count"]
    return [
        (f"density: the last of {dn} starts <= 1.5x the first", f"{ds[-1]:.0f} vs {ds[0]:.0f} ms ({ds[-1] / ds[0]:.2f}x)",
         ds[-1] <= 1.5 * ds[0]),
        (f"density: {dn} idle sandboxes use <= 50% of one core", f"{den['idle_cpu_pct_of_one_core']}%",
         den["idle_cpu_pct_of_one_core"] <= 50),
        (f"density: nothing left after removing {dn} sandboxes",
         f"{len(den['left']['processes'])} processes, {len(den['left']['directories'])} directories",
         not den["left"]["processes"] and not den["left"]["directories"]),
    ]


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
    qfloor = r.get("qemu_floor", {}).get("ms", {}).get("median", 0)
    many = r["memory"]["kata"].get(n, r["memory"]["kata"]["1"])["mean"]
    return [
        ("floor with the built kernel <= 60% of the floor with Debian's (both with an initrd)",
         f"{own_floor:.0f} ms vs {deb_floor:.0f} ms ({own_floor / deb_floor:.0%})", own_floor <= 0.6 * deb_floor),
        (f"rootfs image: >= 30 MiB less host PSS per sandbox than the initrd with {n} sandboxes, cold start <= +10%",
         f"{(ird_pss - img_pss) / 1024:.1f} MiB less ({img_pss / 1024:.1f} vs {ird_pss / 1024:.1f}); "
         f"start {img_start:.0f} vs {ird_start:.0f} ms ({img_start / ird_start - 1:+.0%})",
         ird_pss - img_pss >= 30 * 1024 and img_start <= 1.1 * ird_start),
        ("kata cold start - QEMU's own floor <= 300 ms (the replayed command line in brackets)",
         f"{kata - qfloor:.0f} ms ({kata:.0f} - {qfloor:.0f}; replay {floor:.0f})", kata - qfloor <= 300),
        (f"idle QEMU PSS <= 150 MiB (default_memory = {mem})", f"{one['qemu_pss_kib'] / 1024:.1f} MiB", one["qemu_pss_kib"] <= 150 * 1024),
        ("idle sandbox PSS <= 80 MiB", f"{one['total_pss_kib'] / 1024:.1f} MiB", one["total_pss_kib"] <= 80 * 1024),
        (f"idle sandbox PSS <= 100 MiB with {n} at once", f"{many['total_pss_kib'] / 1024:.1f} MiB",
         many["total_pss_kib"] <= 100 * 1024),
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
    ] + density_targets(r.get("density"))


PHASE_LABELS = {
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


def generated(r):
    """BENCHMARKS.md's generated part: one section per measurement."""
    sections = (header_md, latency_md, floors_md, pod_start_md, cri_streaming_md, guests_md, breakdown_md, memory_md,
                factory_md, density_md, scrape_md, fs_md, direct_volume_md, seccomp_md)
    return "\n".join(line for section in sections for line in section(r))


def header_md(r):
    m = r["machine"]
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
    return lines


def latency_md(r):
    s, e, fl = r["cold_start_ms"], r["exec_ms"], r["floor"]
    lines = [
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
    return lines


def pod_start_md(r):
    ps = r.get("pod_start")
    if not ps:
        return []
    lines = [
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
    return lines


def cri_streaming_md(r):
    cs = r.get("cri_streaming")
    if not cs:
        return []
    lines = [
        "",
        f"## Exec, port-forward and ConfigMap updates through the CRI (containerd {cs['containerd']}, "
        f"{cs.get('iterations', '?')} each{', ' + cs['date'] if cs.get('date') else ''})",
        "",
        "As a kubelet's users feel them (crates/shim/examples/cri_streaming.rs): ExecSync of `true`; an HTTP "
        "GET of a 32 MiB body from a server on the pod's 127.0.0.1 through PortForward and containerd's "
        "streaming server (websocket, as `kubectl port-forward` through a kubelet; kata relays it through "
        "the agent, docs/kubernetes.md); a ConfigMap update, from the host's swap of `..data` to the "
        "container's log line with the new value (the container polls every 10 ms; kata copies the "
        "volume into the guest, scanned every 100 ms).",
        "",
        "| what | runtime | min | median | max |",
        "|---|---|---|---|---|",
    ]
    for key, what in (("exec_ms", "ExecSync `true` (ms)"), ("port_forward_mib_s", "port-forward (MiB/s)"),
                      ("configmap_ms", "ConfigMap update to the container (ms)")):
        for rt in ("runc", "kata"):
            d = cs[rt][key]
            lines.append(f"| {what} | {rt} | {d['min']:.1f} | {d['median']:.1f} | {d['max']:.1f} |")
    return lines


def guests_md(r):
    lines = [
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
    return lines


def breakdown_md(r):
    s, fl, br = r["cold_start_ms"], r["floor"], r["breakdown_ms"]
    kata, floor = s["kata"]["median"], fl["ms"]["median"]
    labels = PHASE_LABELS
    lines = [
        "",
        f"Kata's cold start is **{kata - floor:.0f} ms** above the floor (ratio {kata / floor:.2f}); "
        f"the floor's QEMU alone idles at {fl['qemu_idle_pss_kib'] / 1024:.1f} MiB PSS.",
        "",
        "### Where a kata cold start goes (median ms, from the shim's tracing spans)",
        "",
        "| phase | median |",
        "|---|---|",
    ]
    top = 0
    for p in PHASES:
        v = med(br.get(p, []))
        if p in ("config_load", "rootfs_mount", "vm_boot", "container_create", "process_start", "teardown"):
            top += v
        lines.append(f"| {labels[p]} | {v:.0f} |")
    lines.append(f"| containerd, ctr and shim start-up (the rest of the median) | {max(kata - top, 0):.0f} |")
    return lines


def memory_md(r):
    mem = r["memory"]
    lines = [
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
    return lines


def factory_md(r):
    labels = PHASE_LABELS
    fac = r["factory"]
    lines = [
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
    return lines


def scrape_md(r):
    lines = [
        "",
        "## Metrics scrapes (ms; shim: its monitor socket's /metrics; kata-monitor: /metrics of all sandboxes)",
        "",
        "| sandboxes | shim median | shim p99 | kata-monitor median | kata-monitor p99 | kata-monitor RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for n, d in r["scrape"].items():
        lines.append(f"| {n} | {d['shim_ms']['median']} | {d['shim_ms']['p99']} | {d['monitor_ms']['median']} | "
                     f"{d['monitor_ms']['p99']} | {d['monitor_rss_kib'] / 1024:.1f} |")
    return lines


def fs_md(r):
    fs = r["fs"]
    lines = [
        "",
        f"## Shared filesystem ({fs['file_mib']} MiB file, {fs['small_files']} small files, in the container's rootfs; median of {fs.get('repeats', 1)} runs)",
        "",
        "| runtime | write MiB/s | read MiB/s (page cache dropped in the container's kernel and on the host) | create+stat+delete (ms) |",
        "|---|---|---|---|",
    ]
    for name, d in fs["results"].items():
        lines.append(f"| {name} | {d['write_mib_s']} | {d['read_mib_s']} | {d['meta_ms']} |")
    return lines


def direct_volume_md(r):
    dv = r["direct_volume"]
    lines = [
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
    return lines


def seccomp_md(r):
    sc = r["seccomp"]
    lines = [
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
    return lines


def floor_accel(r):
    """The accelerator QEMU's own floor booted with (older results: always TCG)."""
    argv = r.get("qemu_floor", {}).get("argv", [])
    return argv[argv.index("-accel") + 1] if "-accel" in argv[:-1] else "tcg"


def floors_md(r):
    qf, fl = r.get("qemu_floor"), r["floor"]
    if not qf:
        return []
    kata = r["cold_start_ms"]["kata"]["median"]
    lines = [
        "",
        "## Boot floors and what each option of the runtime's command line costs",
        "",
        f"QEMU's own floor: `-accel {floor_accel(r)} -M q35 -m 2048 -nodefaults`, the installed guest kernel, a busybox-only "
        "initrd whose `/init` prints a line, the runtime's kernel parameters; spawn to that line. The replay: "
        "the runtime's own QEMU (and virtiofsd) command line, spawn to the agent's first line.",
        "",
        "| | min ms | median ms | max ms | idle QEMU PSS MiB |",
        "|---|---|---|---|---|",
        f"| QEMU's own floor | {qf['ms']['min']:.0f} | {qf['ms']['median']:.0f} | {qf['ms']['max']:.0f} | {qf['qemu_idle_pss_kib'] / 1024:.1f} |",
        f"| the runtime's command line replayed | {fl['ms']['min']:.0f} | {fl['ms']['median']:.0f} | {fl['ms']['max']:.0f} | {fl['qemu_idle_pss_kib'] / 1024:.1f} |",
        f"| kata `ctr run --rm true` | {r['cold_start_ms']['kata']['min']:.0f} | {kata:.0f} | {r['cold_start_ms']['kata']['max']:.0f} | |",
        "",
        f"kata is {kata - qf['ms']['median']:.0f} ms above QEMU's own floor: {fl['ms']['median'] - qf['ms']['median']:.0f} ms "
        f"are the machine, devices and root the runtime asks for, {kata - fl['ms']['median']:.0f} ms the runtime, "
        "containerd and ctr around the boot.",
    ]
    bis = r.get("floor_bisect")
    if bis:
        lines += [
            "",
            f"Each option of the replayed command line removed (or replaced) alone; the runtime's guest "
            f"to the agent's first line, median of {r.get('bisect_iterations', r['iterations'])} boots, the cases "
            "in turn. A negative saving is noise or a slower boot without the option; *needed* is an option "
            "without which the guest does not reach the agent.",
            "",
            "| option | median ms | saves ms |",
            "|---|---|---|",
        ]
        for b in bis:
            if b.get("needed"):
                lines.append(f"| {b['option']} | needed ({b['booted']} of {b['of']} booted): "
                             f"{b.get('why', '').replace('|', '/')} | |")
            elif b.get("not_in_command_line"):
                lines.append(f"| {b['option']} | not in the command line | |")
            else:
                lines.append(f"| {b['option']} | {b['ms']['median']:.0f} | {b['saves_ms']:+.0f} |")
    return lines


def density_md(r):
    d = r.get("density")
    if not d:
        return []
    s = d["start_ms"]
    return [
        "",
        f"## Density: {d['count']} sandboxes started one after another, kept idle",
        "",
        f"`ctr run -d --runtime io.containerd.kata.v2 IMAGE ID sleep` until the task runs, one after another "
        f"(default configuration, {r['guest_memory_mib']} MiB guests), all kept running; then {d['idle_seconds']} s idle.",
        "",
        "| | |",
        "|---|---|",
        f"| start of the first / median / last | {s[0]:.0f} / {med(s):.0f} / {s[-1]:.0f} ms ({s[-1] / s[0]:.2f}x) |",
        f"| host CPU of the {d['count']} idle sandboxes (shims, QEMU, virtiofsd) | {d['idle_cpu_pct_of_one_core']}% of one core |",
        *([f"| of which QEMU (the guests) / shims / virtiofsd | "
           f"{by['qemu']}% / {by['shim']}% / {by['virtiofsd']}% |"]
          if (by := d.get("idle_cpu_pct_by_process")) else []),
        f"| their total PSS | {d['total_pss_kib'] / 1048576:.2f} GiB ({d['total_pss_kib'] / 1024 / d['count']:.0f} MiB each) |",
        f"| all removed in | {d['removed_in_s']} s |",
        f"| left afterwards | {len(d['left']['processes'])} processes, {len(d['left']['directories'])} directories |",
    ]


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
