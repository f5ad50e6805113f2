"""Start latency: cold starts, the pod start through the CRI (containerd 2.1, both handlers), exec, and the raw-QEMU floor."""
import json
import os
import shutil
import tempfile
import time

from .config import HERE, IMAGE, RUNTIMES, runtime_args
from .floors import AGENT_LINE, bisect, boot_ms
from .host import cmdline, ctr, sandbox_pids, sh, summary, timed


def wait_running(sock, cid):
    deadline = time.time() + 120
    while time.time() < deadline:
        out = ctr(sock, "task", "ls").stdout
        if any(l.startswith(cid) and "RUNNING" in l for l in out.splitlines()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"task {cid} never ran")


def start_detached(sock, rt, cid, cfg=None):
    remove(sock, cid)
    ctr(sock, "run", "-d", "--runtime", rt, *runtime_args(cfg), IMAGE, cid, "sleep", "1000")
    wait_running(sock, cid)


def remove(sock, cid):
    if cid in ctr(sock, "task", "ls", "-q").stdout.split():
        ctr(sock, "task", "kill", "-s", "SIGKILL", cid, check=False)
        deadline = time.time() + 30
        while ctr(sock, "task", "rm", cid, check=False).returncode != 0 and time.time() < deadline:
            time.sleep(0.2)
    if cid in ctr(sock, "container", "ls", "-q").stdout.split():
        ctr(sock, "container", "rm", cid, check=False)


def bench_cold_start(sock, n, name, rt, cfg=None):
    samples = [timed(lambda i=i: ctr(sock, "run", "--runtime", rt, *runtime_args(cfg), "--rm", IMAGE,
                                     f"bench-start-{name}-{i}", "true")) for i in range(n)]
    return summary(samples)


def cri_containerd(version):
    """containerd VERSION started, the busybox and pause images in its CRI namespace: its socket and
    network namespace."""
    cs = os.path.join(HERE, "scripts", "containerd.sh")
    sock = sh(cs, "start", version).stdout.strip()
    netns = sh(cs, "netns", version).stdout.strip()
    ctr_bin = os.path.join(sh(cs, "bin", version).stdout.strip(), "ctr")
    pause = '["/bin/sh","-c","trap \'exit 0\' TERM INT; while :; do sleep 3600 & wait $!; done"]'
    for ref, entry in ((IMAGE, None), ("kata.local/pause:3.6", pause)):
        tar = f"/tmp/kata-bench-cri-{ref.replace('/', '_').replace(':', '_')}.tar"
        sh(os.path.join(HERE, "scripts", "busybox-image.sh"), tar, ref, *([entry] if entry else []))
        sh(ctr_bin, "-a", sock, "-n", "k8s.io", "images", "import", tar)
        os.unlink(tar)
    return sock, netns


def build_example(name):
    """Builds the shim crate's example NAME; its path."""
    sh("cargo", "build", "--quiet", "--manifest-path", os.path.join(HERE, "Cargo.toml"),
       "-p", "containerd-shim-kata-v2", "--example", name)
    return os.path.join(HERE, "target", "debug", "examples", name)


def bench_pod_start(n, version="2.1"):
    """A CRI pod (RunPodSandbox, then one container running, then stop and remove) through
    containerd VERSION's CRI plugin, with the `kata` handler (containerd runs a pause container
    in the VM) and `kata-sandbox-api` (containerd 2.x's sandbox API: the shim is asked for the
    pod, no pause container); crates/shim/examples/pod_start.rs drives it as a kubelet would."""
    sock, _ = cri_containerd(version)
    tool = build_example("pod_start")
    res = {"containerd": version}
    for handler in ("kata", "kata-sandbox-api"):
        out = json.loads(sh(tool, sock, handler, str(n)).stdout)
        res[handler] = {k: summary(v) for k, v in out.items()}
    return res


def bench_cri_streaming(n, version="1.6"):
    """What a kubelet's users feel through containerd VERSION's CRI plugin, `runc` beside `kata`:
    ExecSync latency, port-forward throughput over the streaming server's websocket, and a
    ConfigMap update's time to the container (crates/shim/examples/cri_streaming.rs)."""
    sock, netns = cri_containerd(version)
    tool = build_example("cri_streaming")
    res = {"containerd": version}
    for handler in ("runc", "kata"):
        out = json.loads(sh(tool, sock, netns, handler, str(n)).stdout)
        res[handler] = {k: summary(v) for k, v in out.items()}
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


def bench_floor(sock, n, cfg=None, bisect_n=0):
    """Replays the exact QEMU and virtiofsd command lines of a kata sandbox (same kernel, initrd,
    accelerator, memory and devices), started by the bench, to the agent's first console line;
    with `bisect_n`, also each option of that command line removed in turn (floors.bisect)."""
    cid = "bench-floor-src"
    start_detached(sock, RUNTIMES["kata"], cid, cfg)
    _, qemu, vfsd = sandbox_pids(cid)
    if len(qemu) != 1:
        raise RuntimeError(f"expected one QEMU for {cid}, found {qemu}")
    q, v = cmdline(qemu[0]), (cmdline(vfsd[0]) if vfsd else None)
    remove(sock, cid)
    base = tempfile.mkdtemp(prefix="kata-bench-floor-")
    shared = os.path.join(base, "shared")
    os.makedirs(os.path.join(shared, "shared"))  # the sandbox's export (mounts/ is not needed)

    def sub(a):
        return (a.replace(f"/run/vc/vm/{cid}", base)
                 .replace(f"/run/kata-containers/shared/sandboxes/{cid}", shared)
                 .replace(f"sandbox-{cid}", "sandbox-bench-floor"))

    q = [sub(a) for a in q]
    v = [sub(a) for a in v] if v else None
    helper = (v, v[v.index("--socket-path") + 1]) if v else None
    console = os.path.join(base, "console.log")
    samples, keep = [], {}
    try:
        for i in range(n):
            took = boot_ms(q, console, AGENT_LINE, helper, keep=keep if i == 0 else None)
            if took is None:
                raise RuntimeError(f"raw QEMU never printed the agent's first line; see {console}")
            samples.append(took)
        out = {"ms": summary(samples), "qemu_idle_pss_kib": keep.get("pss_kib", 0), "argv": q}
        if bisect_n:
            out["bisect"] = bisect(q, v, base, bisect_n)
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)
