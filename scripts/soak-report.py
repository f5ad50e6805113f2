#!/usr/bin/python3
"""Writes the soak-and-fault figures (make soak) into BENCHMARKS.md, between its soak markers.

    scripts/soak-report.py bench/soak.json bench/slow-reader.json bench/give-back.json BENCHMARKS.md
"""
import json
import sys

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def section(soak, slow, give_back):
    faults = ", ".join(f"{k} x{v}" for k, v in soak["faults"].items()) or "none"
    lines = [
        "<!-- Written by scripts/soak-report.py (`make soak`); the figures are in bench/soak.json, bench/slow-reader.json and bench/give-back.json. -->",
        "",
        f"- Cycles: **{soak['cycles']}** (`ctr run --rm` and a CRI pod with two containers and four execs in each), "
        f"in {soak['seconds']} s.",
        f"- Faults injected: **{soak['faults_injected']}** ({faults}); each pod was stopped and removed by the CRI afterwards.",
        f"- Leaks found by the census (processes, mounts, cgroups, state directories, taps, CNI interfaces, network "
        f"namespaces, shims, containerd's descriptors {soak['containerd_fds']['before']} -> {soak['containerd_fds']['after']}): "
        f"**{len(soak['leaks'])}**" + ("" if not soak["leaks"] else ": " + "; ".join(soak["leaks"])),
    ]
    if slow:
        lines.append(
            f"- Slow reader: a container wrote {slow['mib']} MiB while the host read 64 KiB every 2 ms "
            f"({slow['seconds']:.0f} s): the writer waited in write(2), {slow['bytes_lost']} bytes lost, agent (PID 1) RSS "
            f"{slow['agent_rss_idle_bytes'] / 1048576:.1f} MiB idle, at most **{slow['agent_rss_max_bytes'] / 1048576:.1f} MiB** "
            f"(target <= 32 MiB: {'met' if slow['agent_rss_max_bytes'] <= 32 << 20 else '**missed**'}).")
    for key, what in (("dimms", "DIMMs (the default)"), ("virtio_mem", "virtio-mem")):
        g = (give_back or {}).get(key)
        if not g:
            continue
        first, last = g["first_pss_kib"], g["last_pss_kib"]
        met = last <= first * 1.1
        lines.append(
            f"- Give-back, {what}: a pod's container with a 256 MiB memory limit and one CPU created and removed "
            f"{g['cycles']} times; each time the guest came back to its boot vCPUs and MemTotal. QEMU's host PSS "
            f"{first / 1024:.1f} MiB after the first cycle, {last / 1024:.1f} MiB after the last "
            f"({last / first - 1:+.0%}; target within 10%: {'met' if met else '**missed**'}). Grew most: {g['grew_most']}.")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        soak = json.load(f)
    try:
        with open(sys.argv[2]) as f:
            slow = json.load(f)
    except FileNotFoundError:
        slow = None
    try:
        with open(sys.argv[3]) as f:
            give_back = json.load(f)
    except FileNotFoundError:
        give_back = None
    with open(sys.argv[4]) as f:
        text = f.read()
    body = section(soak, slow, give_back)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{BEGIN}\n{body}{END}{tail}"
    else:
        text = text.rstrip("\n") + f"\n\n## Soak and faults (`make soak`)\n\n{BEGIN}\n{body}{END}\n"
    with open(sys.argv[4], "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
