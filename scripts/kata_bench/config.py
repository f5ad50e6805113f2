"""The configurations the bench runs: read with tomllib, derived from the installed one by a
drop-in (`config.d/99-bench.toml`, as an administrator would), never edited as text."""
import json
import os
import shutil
import tomllib

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "kata.local/busybox:latest"
RUNTIMES = {"runc": "io.containerd.runc.v2", "kata": "io.containerd.kata.v2"}
DEFAULT_CONFIG = "/opt/kata/share/defaults/kata-containers/configuration.toml"
ASSETS = "/opt/kata/share/kata-containers"
DEBIAN_PIN = os.path.join(HERE, "guest", "kernel", "debian-version")
TEMPLATE_PATH = "/run/vc/vm/bench-template"
KATA_RUNTIME = "/opt/kata/bin/kata-runtime"
CACHE_ENDPOINT = "/run/vc/bench-vmcache.sock"


def read(path=DEFAULT_CONFIG):
    """The configuration file `path` and its drop-ins, merged as the runtime merges them."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    dropins = os.path.join(os.path.dirname(path), "config.d")
    if os.path.isdir(dropins):
        for name in sorted(os.listdir(dropins)):
            if name.endswith(".toml"):
                with open(os.path.join(dropins, name), "rb") as f:
                    merge(doc, tomllib.load(f))
    return doc


def merge(base, over):
    """Merges the table `over` into `base`, key by key (tables recursively)."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v


def hypervisor(doc):
    """(name, table) of the configuration's one `[hypervisor.<name>]` section."""
    sections = doc.get("hypervisor", {})
    if len(sections) != 1:
        raise RuntimeError(f"{DEFAULT_CONFIG} must have one [hypervisor.*] section, has {sorted(sections)}")
    return next(iter(sections.items()))


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def derive(work, name, overrides):
    """A configuration of its own in `work/name/`: the installed file and its drop-ins, plus
    `config.d/99-bench.toml` holding `overrides` ({"hypervisor": {...}, "factory": {...}}: the
    hypervisor's keys go to its own section). Returns its path."""
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "config.d"))
    path = os.path.join(d, "configuration.toml")
    shutil.copyfile(DEFAULT_CONFIG, path)
    installed = os.path.join(os.path.dirname(DEFAULT_CONFIG), "config.d")
    if os.path.isdir(installed):
        for f in sorted(os.listdir(installed)):
            if f.endswith(".toml"):
                shutil.copyfile(os.path.join(installed, f), os.path.join(d, "config.d", f))
    hv_name, _ = hypervisor(read())
    lines = ["# Written by scripts/bench.py: what this configuration changes."]
    for section, keys in overrides.items():
        header = f"hypervisor.{hv_name}" if section == "hypervisor" else section
        lines.append(f"[{header}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    with open(os.path.join(d, "config.d", "99-bench.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def guest_memory_mib():
    return int(hypervisor(read())[1]["default_memory"])


def guest_configs(work):
    """{guest name: (config path or None for the installed default, kernel file, root)}: the
    project's kernel with the rootfs image (NVDIMM, DAX) and with the initrd, one of which is the
    installed default, and Debian's generic kernel with its own initrd (modules)."""
    _, hv = hypervisor(read())
    default_kernel = os.path.realpath(hv["kernel"])
    default_root = "image" if hv.get("image") else "initrd"
    with open(DEBIAN_PIN) as f:
        ver = f.read().strip() + "-amd64"
    kernel, initrd = f"{ASSETS}/vmlinux-{ver}", f"{ASSETS}/kata-containers-initrd-{ver}.img"
    image, own_initrd = f"{ASSETS}/kata-containers.img", f"{ASSETS}/kata-containers-initrd.img"
    for path in (kernel, initrd, image, own_initrd):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: 'make install' installs it")
    guests = {f"kata-rs {default_root}": (None, default_kernel, default_root)}
    if default_root == "image":
        other = derive(work, "initrd", {"hypervisor": {"image": "", "initrd": own_initrd}})
        guests["kata-rs initrd"] = (other, default_kernel, "initrd")
    else:
        other = derive(work, "image", {"hypervisor": {"image": image, "initrd": ""}})
        guests["kata-rs image"] = (other, default_kernel, "image")
    debian = derive(work, "debian-kernel", {"hypervisor": {"kernel": kernel, "initrd": initrd, "image": ""}})
    guests["debian initrd"] = (debian, kernel, "initrd")
    return guests


def factory_configs(work, cache_number):
    """(cold, template, vmcache) configurations: the installed one with the initrd and virtio-9p
    (what templating needs), without and with `enable_template`, and with `vm_cache_number`."""
    guest = {"image": "", "initrd": f"{ASSETS}/kata-containers-initrd.img", "shared_fs": "virtio-9p"}
    cold = derive(work, "cold-9p", {"hypervisor": guest})
    tpl = derive(work, "template", {
        "hypervisor": {**guest, "reclaim_guest_freed_memory": False},
        "factory": {"enable_template": True, "template_path": TEMPLATE_PATH},
    })
    cache = derive(work, "vmcache", {
        "hypervisor": guest,
        "factory": {"vm_cache_number": cache_number, "vm_cache_endpoint": CACHE_ENDPOINT},
    })
    return cold, tpl, cache


def runtime_args(cfg):
    return ["--runtime-config-path", cfg] if cfg else []
