"""Storage throughput: the shared filesystem (virtio-fs, virtio-9p, runc) and direct volumes."""
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from .config import DEFAULT_CONFIG, IMAGE, RUNTIMES
from .factory import kata_runtime
from .host import containerd_log_since, ctr, log_size, sh, summary, timed


UNCONFINED = "kata virtio-fs, virtiofsd unconfined"
DV_HOST, DV_KATA = "runc, the loop device mounted on the host", "kata, direct volume (virtio-scsi, the default)"
DV_KATA_BLK = "kata, direct volume (virtio-blk)"


DV_HOST, DV_KATA = "runc, the loop device mounted on the host", "kata, direct volume (virtio-scsi, the default)"
DV_KATA_BLK = "kata, direct volume (virtio-blk)"


DV_KATA_BLK = "kata, direct volume (virtio-blk)"


# Between the write and the read, the page cache is dropped in the container's kernel (the guest's
# for kata) and, through a handshake over a bind-mounted directory, on the host (virtiofsd and 9p
# read through the host's cache): the read is cold on both sides for every runtime.
FS_SCRIPT = """t() { cut -d' ' -f1 /proc/uptime; }
d=${3:-}
s=$(t); dd if=/dev/zero of=$d/bench.file bs=1M count=$1 conv=fsync 2>/dev/null || exit 1; e=$(t); echo "write $s $e"
sync; echo 3 > /proc/sys/vm/drop_caches || exit 1
touch /sig/guest-dropped; i=0
while [ ! -e /sig/host-dropped ]; do i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep 0.1; done
s=$(t); dd if=$d/bench.file of=/dev/null bs=1M 2>/dev/null || exit 1; e=$(t); echo "read $s $e"
rm -f $d/bench.file; mkdir -p $d/bench.dir; cd $d/bench.dir
s=$(t); i=0; while [ $i -lt $2 ]; do echo x > f$i; i=$((i+1)); done; ls -l > /dev/null; rm -f f*; e=$(t); echo "meta $s $e"
"""


def bench_fs(sock, mib, files, repeats=3):
    """Sequential write/read of a file and create+stat+delete of small files in the rootfs.
    The container is privileged so it can drop the (guest's, for kata) page cache before reading."""
    work = tempfile.mkdtemp(prefix="kata-bench-fs-")
    script = os.path.join(work, "fs.sh")
    with open(script, "w") as f:
        f.write(FS_SCRIPT)
    cfg9p = os.path.join(work, "configuration-9p.toml")
    with open(DEFAULT_CONFIG) as f:
        text = f.read()
    if 'shared_fs = "virtio-fs"' not in text:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no shared_fs = \"virtio-fs\" line to switch")
    with open(cfg9p, "w") as f:
        f.write(text.replace('shared_fs = "virtio-fs"', 'shared_fs = "virtio-9p"'))
    # virtiofsd without its sandbox and seccomp filter (what the runtime ran before), to price
    # the confinement.
    cfg_open = os.path.join(work, "configuration-virtiofsd-unconfined.toml")
    m = re.search(r'^virtio_fs_extra_args = \[(.*)\]$', text, re.M)
    if not m:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no virtio_fs_extra_args line")
    with open(cfg_open, "w") as f:
        f.write(text[:m.start()] + f'virtio_fs_extra_args = [{m.group(1)}, "--sandbox", "none", "--seccomp", "none"]' + text[m.end():])
    cases = [("runc", RUNTIMES["runc"], []), ("kata virtio-fs", RUNTIMES["kata"], []),
             ("kata virtio-fs, virtiofsd unconfined", RUNTIMES["kata"], ["--runtime-config-path", cfg_open]),
             ("kata virtio-9p", RUNTIMES["kata"], ["--runtime-config-path", cfg9p])]
    sig = os.path.join(work, "sig")
    runs = {name: [] for name, _, _ in cases}
    try:
        # Round-robin over the cases, `repeats` times: drift on the host spreads over all of
        # them; each figure is the median of its runs.
        for _ in range(repeats):
            for name, rt, extra in cases:
                runs[name].append(fs_run(sock, name, rt, extra, script, sig, mib, files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {}
    for name, rs in runs.items():
        res[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        res[name]["runs"] = rs
    return {"file_mib": mib, "small_files": files, "repeats": repeats, "results": res}


def fs_run(sock, name, rt, extra, script, sig, mib, files, directory=""):
    """One run of FS_SCRIPT in a privileged container (on `directory`, default the rootfs); its
    figures."""
    shutil.rmtree(sig, ignore_errors=True)
    os.makedirs(sig)
    run = subprocess.Popen(["ctr", "-a", sock, "run", "--rm", "--privileged", "--runtime", rt, *extra,
                            "--mount", f"type=bind,src={script},dst=/fs.sh,options=rbind:ro",
                            "--mount", f"type=bind,src={sig},dst=/sig,options=rbind:rw",
                            IMAGE, "bench-fs", "sh", "/fs.sh", str(mib), str(files), directory],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(sig, "guest-dropped")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
    open(os.path.join(sig, "host-dropped"), "w").close()
    out, err = run.communicate(timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"shared-fs run of {name} failed ({run.returncode}): {err.strip()}")
    r = {}
    for line in out.splitlines():
        k, s, e = line.split()
        r[k + "_ms"] = round((float(e) - float(s)) * 1000)
    r["write_mib_s"] = round(mib / max(r["write_ms"], 10) * 1000, 1)
    r["read_mib_s"] = round(mib / max(r["read_ms"], 10) * 1000, 1)
    return r


def bench_direct_volume(sock, mib, n, repeats=3):
    """A direct volume (an ext4 loop device hot-plugged into the VM) against the same loop device
    mounted on the host and used by a runc container: sequential write and cold read
    (FS_SCRIPT), the QMP hot-plug time from the shim's log, and what the volume adds to
    `ctr run --rm true`."""
    work = tempfile.mkdtemp(prefix="kata-bench-dv-")
    script = os.path.join(work, "fs.sh")
    with open(script, "w") as f:
        f.write(FS_SCRIPT)
    image = os.path.join(work, "vol.img")
    with open(image, "wb") as f:
        f.truncate((2 * mib + 64) << 20)
    sh("mkfs.ext4", "-q", "-F", image)
    dev = sh("losetup", "-f", "--show", image).stdout.strip()
    vol, host_mnt, sig = (os.path.join(work, x) for x in ("vol", "host", "sig"))
    os.makedirs(vol)
    os.makedirs(host_mnt)
    kata_runtime = "/opt/kata/bin/kata-runtime"
    sh(kata_runtime, "direct-volume", "add", "--volume-path", vol, "--mount-info",
       json.dumps({"volume-type": "block", "device": dev, "fstype": "ext4"}))
    with open(DEFAULT_CONFIG) as f:
        text = f.read()
    if 'block_device_driver = "virtio-scsi"' not in text:
        raise RuntimeError(f"{DEFAULT_CONFIG} has no block_device_driver = \"virtio-scsi\" line to switch")
    cfg_blk = os.path.join(work, "configuration-virtio-blk.toml")
    with open(cfg_blk, "w") as f:
        f.write(text.replace('block_device_driver = "virtio-scsi"', 'block_device_driver = "virtio-blk"'))
    host_case, kata_case = DV_HOST, DV_KATA
    runs = {host_case: [], kata_case: [], DV_KATA_BLK: []}
    try:
        log_before = log_size()
        for _ in range(repeats):
            sh("mount", dev, host_mnt)
            try:
                runs[host_case].append(fs_run(sock, host_case, RUNTIMES["runc"],
                                              ["--mount", f"type=bind,src={host_mnt},dst=/vol,options=rbind:rw"],
                                              script, sig, mib, 1, "/vol"))
            finally:
                sh("umount", host_mnt)
            for name, extra in ((kata_case, []), (DV_KATA_BLK, ["--runtime-config-path", cfg_blk])):
                runs[name].append(fs_run(sock, name, RUNTIMES["kata"],
                                         [*extra, "--mount", f"type=bind,src={vol},dst=/vol,options=rbind:rw"],
                                         script, sig, mib, 1, "/vol"))
        with_volume = summary([timed(lambda i=i: ctr(
            sock, "run", "--runtime", RUNTIMES["kata"], "--rm",
            "--mount", f"type=bind,src={vol},dst=/vol,options=rbind:rw",
            IMAGE, f"bench-dv-start-{i}", "true")) for i in range(n)])
        without = summary([timed(lambda i=i: ctr(
            sock, "run", "--runtime", RUNTIMES["kata"], "--rm", IMAGE, f"bench-dv-plain-{i}", "true"))
            for i in range(n)])
        hotplug = [int(x) for x in re.findall(r"direct volume hot-plugged.*?hotplug_ms=(\d+)",
                                               containerd_log_since(log_before))]
    finally:
        sh(kata_runtime, "direct-volume", "remove", "--volume-path", vol, check=False)
        sh("umount", host_mnt, check=False)
        sh("losetup", "-d", dev, check=False)
        shutil.rmtree(work, ignore_errors=True)
    if len(hotplug) != 2 * repeats + n:
        raise RuntimeError(f"expected {2 * repeats + n} hot-plug lines in the shim log, found {len(hotplug)}")
    res = {}
    for name, rs in runs.items():
        res[name] = {k: statistics.median(r[k] for r in rs) for k in ("write_mib_s", "read_mib_s")}
        res[name]["runs"] = rs
    return {"file_mib": mib, "repeats": repeats, "results": res, "hotplug_qmp_ms": summary(hotplug),
            "start_with_volume_ms": with_volume, "start_without_ms": without}
