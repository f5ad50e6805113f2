//! What the shim's test binaries share: the repository, the project's containerd, locally built
//! images, and a look at the host's processes.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub mod cri;
pub mod ws;

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `scripts/containerd.sh ARGS`; its stdout (the socket, for `start`).
pub fn containerd(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/containerd.sh"))
        .args(args)
        .output()
        .expect("scripts/containerd.sh");
    assert!(
        out.status.success(),
        "containerd.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the busybox image `reference` (running `entrypoint`, a JSON array, when given) and
/// imports it into containerd namespace `namespace`.
pub fn import_image(sock: &str, namespace: &str, reference: &str, entrypoint: Option<&str>) {
    import_image_with(Path::new("ctr"), sock, namespace, reference, entrypoint)
}

/// [`import_image`] with the `ctr` at `ctr` (another containerd version's).
pub fn import_image_with(
    ctr: &Path,
    sock: &str,
    namespace: &str,
    reference: &str,
    entrypoint: Option<&str>,
) {
    build_and_import(ctr, sock, namespace, reference, entrypoint, &[]);
}

/// scripts/busybox-image.sh for `reference` (with `entrypoint`, and `env` for its FILES or
/// SYMLINKS), imported into `namespace` with `ctr`.
fn build_and_import(
    ctr: &Path,
    sock: &str,
    namespace: &str,
    reference: &str,
    entrypoint: Option<&str>,
    env: &[(&str, String)],
) {
    // A file of this call's own: tests running side by side import the same reference.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tar: PathBuf = std::env::temp_dir().join(format!(
        "kata-test-{}-{}-{n}.tar",
        reference.replace(['/', ':'], "_"),
        std::process::id()
    ));
    let mut cmd = Command::new(repo().join("scripts/busybox-image.sh"));
    cmd.arg(&tar).arg(reference).stdout(Stdio::null());
    if let Some(e) = entrypoint {
        cmd.arg(e);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    assert!(
        cmd.status().expect("busybox-image.sh").success(),
        "build {reference}"
    );
    let st = Command::new(ctr)
        .args(["-a", sock, "-n", namespace, "images", "import"])
        .arg(&tar)
        .stdout(Stdio::null())
        .status()
        .expect("ctr images import");
    let _ = std::fs::remove_file(&tar);
    assert!(st.success(), "import {reference}");
}

/// Builds the busybox image `reference` with extra host `files` (host path, image path) and
/// imports it into `namespace`: the images of the tests' static helpers.
pub fn import_image_with_files(
    sock: &str,
    namespace: &str,
    reference: &str,
    files: &[(&Path, &str)],
) {
    let list: Vec<String> = files
        .iter()
        .map(|(h, i)| format!("{}:{i}", h.display()))
        .collect();
    build_and_import(
        Path::new("ctr"),
        sock,
        namespace,
        reference,
        None,
        &[("FILES", list.join(" "))],
    );
}

/// Builds the busybox image `reference` with extra `symlinks` (path in the image, target) and
/// imports it into the default namespace: the hostile images of the security tests.
pub fn import_image_with_symlinks(sock: &str, reference: &str, symlinks: &[(&str, &str)]) {
    let tar: PathBuf = std::env::temp_dir().join(format!(
        "kata-test-{}.tar",
        reference.replace(['/', ':'], "_")
    ));
    let list: Vec<String> = symlinks.iter().map(|(p, t)| format!("{p}:{t}")).collect();
    let st = Command::new(repo().join("scripts/busybox-image.sh"))
        .arg(&tar)
        .arg(reference)
        .env("SYMLINKS", list.join(" "))
        .status()
        .expect("busybox-image.sh");
    assert!(st.success());
    let st = Command::new("ctr")
        .args(["-a", sock, "images", "import"])
        .arg(&tar)
        .stdout(Stdio::null())
        .status()
        .expect("ctr images import");
    assert!(st.success(), "import {reference}");
}

/// Command lines (NUL as space) of the host's processes that contain `needle`.
pub fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmd =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmd.contains(needle) {
            out.push(cmd);
        }
    }
    out
}

/// `kata-runtime ARGS` (the installed binary): (stdout, stderr, exit code).
pub fn kata_runtime(args: &[&str]) -> (String, String, i32) {
    let out = Command::new("/opt/kata/bin/kata-runtime")
        .args(args)
        .output()
        .expect("kata-runtime runs");
    outputs(&out)
}

/// [`kata_runtime`] with `input` on its stdin (then closed), as a script piped into
/// `kata-runtime exec`.
pub fn kata_runtime_with_input(args: &[&str], input: &[u8]) -> (String, String, i32) {
    use std::io::Write;
    let mut child = Command::new("/opt/kata/bin/kata-runtime")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kata-runtime runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    outputs(&child.wait_with_output().expect("kata-runtime ends"))
}

fn outputs(out: &std::process::Output) -> (String, String, i32) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.code().unwrap_or(-1),
    )
}

/// One HTTP/1.1 request over a unix socket: (status, body).
pub fn http_unix(socket: &Path, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: shim\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// `promtool check metrics` on `text`: the problems it reports, less the naming lints that
/// Kata's own family names cause (kept for compatibility with Kata's dashboards; see
/// docs/monitoring.md). Anything else (a parse error, a duplicate, another lint) is returned.
pub fn promtool_problems(text: &str) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let all =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    const KATA_NAMES: &[(&str, &str)] = &[
        (
            "_histogram_milliseconds",
            "metric name should not include type 'histogram'",
        ),
        (
            "_histogram_milliseconds",
            "use base unit \"seconds\" instead of \"milliseconds\"",
        ),
        (
            "kata_agent_scrape_count",
            "non-histogram and non-summary metrics should not have \"_count\" suffix",
        ),
        (
            "kata_monitor_scrape_count",
            "non-histogram and non-summary metrics should not have \"_count\" suffix",
        ),
        (
            "kata_monitor_scrape_failed_count",
            "non-histogram and non-summary metrics should not have \"_count\" suffix",
        ),
        (
            "kata_monitor_scrape_count",
            "counter metrics should have \"_total\" suffix",
        ),
        (
            "kata_monitor_scrape_failed_count",
            "counter metrics should have \"_total\" suffix",
        ),
        (
            "kata_monitor_running_shim_count",
            "non-histogram and non-summary metrics should not have \"_count\" suffix",
        ),
    ];
    all.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !KATA_NAMES.iter().any(|(name, lint)| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|n| n.contains(name))
                    && l.contains(lint)
            })
        })
        .map(str::to_string)
        .collect()
}

/// The default guest kernel's release (`uname -r` in a container): the project's own kernel,
/// as scripts/kernel-build.sh recorded it.
pub fn guest_kernel_release() -> String {
    std::fs::read_to_string(repo().join("build/kernel/release"))
        .expect("build/kernel/release (make kernel)")
        .trim()
        .to_string()
}

/// What sandbox `id` left on the host: its QEMU and virtiofsd, state directories, own network
/// namespace and mounts.
pub fn sandbox_leftovers(id: &str) -> Vec<String> {
    let mut left = processes_with(&format!("sandbox-{id} "));
    left.extend(processes_with(&format!("/run/vc/vm/{id}/")));
    for dir in [
        format!("/run/vc/sbs/{id}"),
        format!("/run/vc/vm/{id}"),
        format!("/run/kata-containers/shared/sandboxes/{id}"),
        // The network namespace a sandbox makes when its manager asks for one (Docker).
        format!("/run/netns/kata-net-{id}"),
    ] {
        if Path::new(&dir).exists() {
            left.push(dir);
        }
    }
    left.extend(sandbox_cgroups(id).iter().map(|p| p.display().to_string()));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&format!("/{id}/")))
            .map(str::to_string),
    );
    left
}

/// Waits up to `within` until sandbox `id` left nothing; fails listing what remains.
pub fn assert_sandbox_gone(id: &str, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = sandbox_leftovers(id);
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind by {id}: {left:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The host cgroup directories of sandbox `id` (`kata_<id>` anywhere, `kata_overhead/<id>`).
pub fn sandbox_cgroups(id: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, leaf: &str, depth: u32, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if e.file_name().to_string_lossy() == leaf {
                out.push(p);
            } else if depth > 0 {
                walk(&p, leaf, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        walk(&h.path(), &format!("kata_{id}"), 6, &mut out);
        let overhead = h.path().join("kata_overhead").join(id);
        if overhead.exists() {
            out.push(overhead);
        }
    }
    out
}

/// The pids (or, with `file` = "tasks", thread ids) a cgroup directory lists.
pub fn cgroup_members(dir: &Path, file: &str) -> Vec<u32> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The pids of a sandbox's virtiofsd: the namespace sandbox's parent, which waits, and the
/// worker it forked.
pub fn virtiofsd_pids(id: &str) -> Vec<u32> {
    let sock = format!("/run/vc/vm/{id}/vfsd.sock");
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.starts_with("/opt/kata/libexec/virtiofsd") && cmd.contains(&sock)
        })
        .collect();
    out.sort_unstable();
    out
}

/// The first pid whose command line contains `needle`.
pub fn pid_with(needle: &str) -> Option<u32> {
    pid_where(|cmd| cmd.contains(needle))
}

/// The first pid whose command line (arguments joined by spaces, with a space at the end)
/// satisfies `pred`.
pub fn pid_where(pred: impl Fn(&str) -> bool) -> Option<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            pred(&String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
}

/// A filesystem image on a loop device, detached and removed on drop.
pub struct LoopImage {
    /// The image file.
    pub file: PathBuf,
    /// The loop device.
    pub dev: String,
}

impl LoopImage {
    /// Makes a `mib` MiB image with a `fstype` filesystem and attaches it.
    pub fn new(dir: &Path, name: &str, mib: u64, fstype: &str) -> LoopImage {
        let file = dir.join(name);
        let f = std::fs::File::create(&file).expect("image");
        f.set_len(mib << 20).expect("size");
        drop(f);
        let mkfs = Command::new(format!("mkfs.{fstype}"))
            .args(if fstype == "xfs" {
                &["-q", "-f"][..]
            } else {
                &["-q", "-F"][..]
            })
            .arg(&file)
            .output()
            .expect("mkfs");
        assert!(
            mkfs.status.success(),
            "{}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopImage {
            file,
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }

    /// Grows the image and tells the loop device.
    pub fn grow(&self, mib: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.file)
            .expect("image");
        f.set_len(mib << 20).expect("grow");
        let st = Command::new("losetup")
            .args(["-c", &self.dev])
            .status()
            .expect("losetup -c");
        assert!(st.success());
    }

    /// Reads a file from the image, mounted read-only on the host.
    pub fn read(&self, dir: &Path, name: &str) -> String {
        let m = dir.join(format!("mnt-{}", self.dev.replace('/', "_")));
        std::fs::create_dir_all(&m).expect("mkdir");
        let st = Command::new("mount")
            .args(["-o", "ro", &self.dev])
            .arg(&m)
            .status()
            .expect("mount");
        assert!(st.success(), "mount {}", self.dev);
        let text = std::fs::read_to_string(m.join(name)).unwrap_or_default();
        let _ = Command::new("umount").arg(&m).status();
        text
    }
}

impl Drop for LoopImage {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// `--config FILE`, or nothing (the search order, with its drop-ins).
fn config_args(config: Option<&str>) -> Vec<&str> {
    config.map(|c| vec!["--config", c]).unwrap_or_default()
}

/// Starts `kata-runtime [--config CONFIG] factory init` (the VMCache server, installed
/// binary) in the background, logging to `log` at info level.
pub fn start_cache_server(config: Option<&str>, log: &Path) -> std::process::Child {
    let f = std::fs::File::create(log).expect("log");
    Command::new("/opt/kata/bin/kata-runtime")
        .args(config_args(config))
        .args(["factory", "init"])
        .env("KATA_LOG", "info")
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .expect("start the VMCache server")
}

/// The QEMU pids `kata-runtime factory status` lists, once the server holds `n` VMs (within
/// 180 s).
pub fn cached_vms(config: Option<&str>, n: usize, log: &Path) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let mut args = config_args(config);
    args.extend(["factory", "status"]);
    loop {
        let (out, _, _) = kata_runtime(&args);
        let pids: Vec<u32> = out
            .lines()
            .filter_map(|l| l.strip_prefix("VM pid = "))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        if pids.len() == n {
            return pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VMCache server did not hold {n} VMs within 180 s: {out}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What cached VMs exist on the host: `/run/vc/vm/vmcache-*` directories, and the QEMU and
/// virtiofsd processes started as cached VMs (a sandbox that took one over has them too).
pub fn cached_vm_leftovers() -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir("/run/vc/vm")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vmcache-"))
        .collect();
    left.extend(processes_with("/run/vc/vm/vmcache-"));
    left
}
