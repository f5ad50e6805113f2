"""Boot floors: QEMU's own (a minimal machine booting the installed guest kernel into a busybox
/init that prints one line), the replay of the runtime's own QEMU command line (the same machine,
devices, kernel and root the runtime asks for) and what each option of that command line costs
(the replay booted with the option removed or replaced, one at a time)."""
import os
import shutil
import stat
import subprocess
import tempfile
import time

from .host import pss_kib, summary

# The runtime's kernel parameters that shape the boot (config.rs's defaults), as the floor uses
# them: the floor differs from the runtime only in the machine, the devices and the root.
KERNEL_PARAMS = ("tsc=reliable no_timer_check noreplace-smp rcupdate.rcu_expedited=1 cryptomgr.notests "
                 "i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 iommu=off")
FLOOR_LINE = b"kata-bench-floor: init"
AGENT_LINE = b"kata-agent:"
QEMU = "/opt/kata/bin/qemu-system-x86_64"
KERNEL = "/opt/kata/share/kata-containers/vmlinux.container"


def _cpio_entry(name, mode, data=b"", rdev=(0, 0)):
    """One newc cpio entry (owner root, mtime 0)."""
    name_b = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def busybox_initrd(path):
    """An initrd of a static busybox and an /init that prints FLOOR_LINE on the console and
    sleeps: the least a Linux guest can do after its kernel boots."""
    busybox = "/bin/busybox"
    with open(busybox, "rb") as f:
        bb = f.read()
    init = (b"#!/bin/busybox sh\n/bin/busybox echo " + FLOOR_LINE + b"\n"
            b"exec /bin/busybox sleep 3600\n")
    entries = [
        _cpio_entry("bin", stat.S_IFDIR | 0o755),
        _cpio_entry("bin/busybox", stat.S_IFREG | 0o755, bb),
        _cpio_entry("dev", stat.S_IFDIR | 0o755),
        _cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _cpio_entry("init", stat.S_IFREG | 0o755, init),
        _cpio_entry("TRAILER!!!", 0),
    ]
    with open(path, "wb") as f:
        f.write(b"".join(entries))


def boot_ms(argv, console, marker, helper=None, keep=None, timeout=60, why=None):
    """Spawns QEMU (after `helper`, e.g. virtiofsd, whose socket it waits for) and times it
    until `marker` is on the console file; None if QEMU exits or the line never comes. With
    `keep`, QEMU's idle PSS 5 s later goes into keep["pss_kib"]; with `why`, a failed boot's
    last line of QEMU's stderr goes into why["error"]. The console's directory is
    cleared first (the sockets and pid file of the last boot), its `shared` directory kept."""
    base = os.path.dirname(console)
    for f in os.listdir(base):
        path = os.path.join(base, f)
        if f != "shared" and not os.path.isdir(path):
            os.unlink(path)
    hp = None
    if helper:
        hargv, sock_path = helper
        hp = subprocess.Popen(hargv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not os.path.exists(sock_path) and time.time() < deadline:
            time.sleep(0.002)
    t0 = time.perf_counter()
    err = open(console + ".stderr", "wb")
    qp = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    took = None
    try:
        while time.perf_counter() - t0 < timeout and qp.poll() is None:
            try:
                with open(console, "rb") as f:
                    if marker in f.read():
                        took = round((time.perf_counter() - t0) * 1000, 1)
                        break
            except OSError:
                pass
            time.sleep(0.002)
        if took is not None and keep is not None:
            time.sleep(5)
            keep["pss_kib"] = pss_kib(qp.pid)
    finally:
        qp.kill()
        qp.wait()
        err.close()
        if took is None and why is not None:
            with open(console + ".stderr", "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            why["error"] = lines[-1] if lines else "no line on the console, nothing on stderr"
        if hp:
            hp.kill()
            hp.wait()
    return took


def qemu_floor(n, accel):
    """QEMU's own floor: `-accel ACCEL -M q35 -m 2048 -nodefaults`, the installed guest kernel, the busybox
    initrd, the runtime's kernel parameters; spawn to the init's line."""
    base = tempfile.mkdtemp(prefix="kata-bench-qemu-floor-")
    try:
        initrd = os.path.join(base, "initrd")
        busybox_initrd(initrd)
        os.makedirs(os.path.join(base, "run"))
        console = os.path.join(base, "run", "console.log")
        argv = [QEMU, "-accel", accel, "-M", "q35", "-m", "2048", "-nodefaults", "-no-user-config",
                "-display", "none", "-serial", f"file:{console}", "-kernel", KERNEL, "-initrd", initrd,
                "-append", f"console=ttyS0 {KERNEL_PARAMS}"]
        keep, samples = {}, []
        for i in range(n):
            took = boot_ms(argv, console, FLOOR_LINE, keep=keep if i == 0 else None)
            if took is None:
                with open(console, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"QEMU's floor never printed its line:\n{tail}")
            samples.append(took)
        argv = [a.replace(base, "$WORK") for a in argv]
        return {"ms": summary(samples), "qemu_idle_pss_kib": keep.get("pss_kib", 0), "argv": argv}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _drop(argv, opt, pred):
    """argv without each `opt VALUE` pair whose VALUE satisfies pred."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == opt and i + 1 < len(argv) and pred(argv[i + 1]):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _set(argv, opt, value):
    """argv with `opt`'s value replaced (the option added if missing)."""
    if opt not in argv:
        return argv + [opt, value]
    out = list(argv)
    out[out.index(opt) + 1] = value
    return out


def _value(argv, opt):
    return argv[argv.index(opt) + 1] if opt in argv else ""


def _without_fs(argv):
    return _drop(_drop(argv, "-device", lambda v: v.startswith("vhost-user-fs-pci")),
                 "-chardev", lambda v: "id=char-fs" in v)


# The options of the runtime's command line, each as what the variant changes. A variant whose
# guest no longer reaches the agent's line is reported as needed, with no figure.
VARIANTS = [
    ("PCI bridge (hot-plug slots for devices added later)",
     lambda a: _drop(a, "-device", lambda v: v.startswith("pci-bridge")), True),
    ("virtio-serial and the agent's port",
     lambda a: _drop(_drop(a, "-device", lambda v: v.startswith(("virtio-serial-pci", "virtserialport"))),
                     "-chardev", lambda v: "id=agent" in v), True),
    ("virtio-rng", lambda a: _drop(_drop(a, "-device", lambda v: v.startswith("virtio-rng-pci")),
                                   "-object", lambda v: v.startswith("rng-random")), True),
    ("virtio-balloon (free page reporting)",
     lambda a: _drop(a, "-device", lambda v: v.startswith("virtio-balloon-pci")), True),
    ("virtio-fs (and virtiofsd)", _without_fs, False),
    ("memory hot-plug (slots, maxmem)",
     lambda a: _set(a, "-m", _value(a, "-m").split(",")[0]), True),
    ("CPU hot-plug (maxcpus)", lambda a: _set(a, "-smp", _value(a, "-smp").split(",")[0]), True),
    ("memfd RAM backend and its NUMA node (shared memory for vhost-user)",
     lambda a: _drop(_drop(_without_fs(a), "-object", lambda v: v.startswith("memory-backend-memfd")),
                     "-numa", lambda v: True), False),
    ("-sandbox (QEMU's seccomp filter)", lambda a: _drop(a, "-sandbox", lambda v: True), True),
    ("-cpu max,pmu=off (QEMU's default CPU model instead)", lambda a: _drop(a, "-cpu", lambda v: True), True),
    ("ACPI (-machine acpi=off)", lambda a: _set(a, "-machine", _value(a, "-machine") + ",acpi=off"), True),
    ("TCG translation cache 32 MiB (-accel tcg, QEMU's default size)",
     lambda a: _set(a, "-accel", "tcg") if _value(a, "-accel").startswith("tcg") else a, True),
]


def bisect(q, v, base, n):
    """Boots the replayed command line `q` (with virtiofsd `v`) as is and with each variant,
    `n` times each, in turn (so that drift hits each alike); medians per variant."""
    console = os.path.join(base, "console.log")
    helper = (v, v[v.index("--socket-path") + 1]) if v else None
    cases = [("the runtime's command line, as is", q, True)] + [
        (name, fn(q), keep_fs) for name, fn, keep_fs in VARIANTS]
    samples = {name: [] for name, _, _ in cases}
    why = {name: {} for name, _, _ in cases}
    for _ in range(n):
        for name, argv, keep_fs in cases:
            if argv == q and name != cases[0][0]:
                continue
            samples[name].append(boot_ms(argv, console, AGENT_LINE, helper if keep_fs else None, timeout=30,
                                         why=why[name]))
    out = []
    base_ms = None
    for name, argv, _ in cases:
        s = samples[name]
        if not s:
            out.append({"option": name, "not_in_command_line": True})
            continue
        ok = [x for x in s if x is not None]
        if len(ok) < len(s):
            out.append({"option": name, "needed": True, "booted": len(ok), "of": len(s),
                        "why": why[name].get("error", "")})
            continue
        med = summary(ok)["median"]
        if base_ms is None:
            base_ms = med
        out.append({"option": name, "ms": summary(ok), "saves_ms": round(base_ms - med, 1)})
    return out
