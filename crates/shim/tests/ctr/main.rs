//! containerd-shim-kata-v2 driven by the real containerd through `ctr`, side by side with runc.
//! Needs root, containerd, QEMU and `make install` (make test provides all of them).

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;

const IMAGE: &str = "kata.local/busybox:latest";
const KATA: &str = "io.containerd.kata.v2";
const RUNC: &str = "io.containerd.runc.v2";

/// Starts (or finds) containerd and imports the test image, once.
fn socket() -> &'static str {
    static SOCKET: OnceLock<String> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let sock = common::containerd(&["start"]);
        common::import_image(&sock, "default", IMAGE, None);
        sock
    })
}

fn ctr(args: &[&str]) -> Output {
    Command::new("ctr")
        .arg("-a")
        .arg(socket())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ctr runs")
}

/// `ctr run --rm` with `script`, feeding `stdin`; returns (stdout, stderr, exit code).
fn run(
    runtime: &str,
    id: &str,
    extra: &[&str],
    script: &str,
    stdin: &str,
) -> (String, String, i32) {
    run_image(runtime, IMAGE, id, extra, script, stdin)
}

/// [`run`] with another image.
fn run_image(
    runtime: &str,
    image: &str,
    id: &str,
    extra: &[&str],
    script: &str,
    stdin: &str,
) -> (String, String, i32) {
    let mut cmd = Command::new("ctr");
    cmd.arg("-a")
        .arg(socket())
        .args(["run", "--runtime", runtime, "--rm"])
        .args(extra)
        .args([image, id, "sh", "-c", script]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait ctr");
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.code().unwrap_or(-1),
    )
}

fn assert_no_leftovers(id: &str) {
    common::assert_sandbox_gone(id, Duration::from_secs(10));
}

/// `ctr run -d` (with `extra` flags) and waits until the task runs.
fn run_detached(runtime: &str, id: &str, extra: &[&str], cmd: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id]);
    args.extend_from_slice(cmd);
    let out = ctr(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_running(id);
}

/// SIGKILLs a running task, waits until it can be removed, removes it and its container.
fn kill_and_remove(id: &str) {
    assert!(
        ctr(&["task", "kill", "-s", "SIGKILL", id]).status.success(),
        "kill {id}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr(&["task", "rm", id]).status.success() {
        assert!(Instant::now() < deadline, "task {id} did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rm = ctr(&["container", "rm", id]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
}

/// Removes a container (and its task) left by an earlier, failed run.
fn force_remove(id: &str) {
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let _ = ctr(&["task", "rm", "-f", id]);
    let _ = ctr(&["container", "rm", id]);
}

fn wait_running(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ctr(&["task", "ls"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if text
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} never ran: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `script` in the foreground with `ctr run --rm`, sends `signal` once it runs, returns
/// (stdout, exit code).
fn killed(runtime: &str, id: &str, script: &str, signal: &str) -> (String, i32) {
    let child = Command::new("ctr")
        .arg("-a")
        .arg(socket())
        .args([
            "run",
            "--runtime",
            runtime,
            "--rm",
            IMAGE,
            id,
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    wait_running(id);
    std::thread::sleep(Duration::from_millis(300));
    let k = ctr(&["task", "kill", "-s", signal, id]);
    assert!(
        k.status.success(),
        "kill: {}",
        String::from_utf8_lossy(&k.stderr)
    );
    let out = child.wait_with_output().expect("wait");
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        out.status.code().unwrap_or(-1),
    )
}

fn mem_total_mib(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// `ctr oci spec` with `args` as the process, `hooks`, and a busybox root filesystem made in
/// `dir`, written to `dir/config.json` (`ctr run --config` takes no image).
fn spec_with_hooks(dir: &std::path::Path, args: &[&str], hooks: serde_json::Value) -> String {
    spec_file(dir, args, |spec| spec["hooks"] = hooks)
}

/// [`spec_with_hooks`] with any change to the spec.
fn spec_file(
    dir: &std::path::Path,
    args: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let root = dir.join("rootfs");
    if !root.exists() {
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("sh");
    }
    let out = Command::new("ctr")
        .args(["oci", "spec"])
        .output()
        .expect("ctr oci spec");
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("spec json");
    spec["process"]["args"] = serde_json::json!(args);
    spec["root"] = serde_json::json!({"path": root.display().to_string(), "readonly": false});
    edit(&mut spec);
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_vec(&spec).expect("json")).expect("write");
    p.display().to_string()
}

/// A tmux session running a plain shell in a 100×30 terminal.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(name: &str) -> Tmux {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", name])
            .status();
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", name, "-x", "100", "-y", "30"])
            .args(["env", "PS1=host$ ", "bash", "--norc", "--noprofile"])
            .status()
            .expect("tmux");
        assert!(st.success(), "tmux new-session");
        Tmux { name: name.into() }
    }

    fn send(&self, line: &str) {
        let st = Command::new("tmux")
            .args(["send-keys", "-t", &self.name, "-l", line])
            .status()
            .expect("tmux send-keys");
        assert!(st.success());
        let st = Command::new("tmux")
            .args(["send-keys", "-t", &self.name, "Enter"])
            .status()
            .expect("tmux send-keys");
        assert!(st.success());
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-S", "-200", "-t", &self.name])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Waits until the screen shows `needle` `times` times.
    fn wait_for(&self, needle: &str, times: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if s.matches(needle).count() >= times {
                return s;
            }
            assert!(Instant::now() < deadline, "{needle:?} never showed:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

fn exec_in(id: &str, exec_id: &str, script: &str) -> (String, String, i32) {
    let out = ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.code().unwrap_or(-1),
    )
}

/// Where the guest's root filesystem comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    /// The rootfs image, mapped read-only as an NVDIMM (DAX).
    ImageNvdimm,
    /// The rootfs image as a read-only virtio-blk disk (`disable_image_nvdimm = true`).
    ImageBlock,
    /// The initrd.
    Initrd,
}

const ASSETS: &str = "/opt/kata/share/kata-containers";
const SHIPPED: &str = "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml";

/// The root the shipped configuration boots.
fn shipped_root() -> Root {
    let text = std::fs::read_to_string(SHIPPED).expect("shipped configuration");
    if text.lines().any(|l| l == "image = \"\"") {
        Root::Initrd
    } else {
        Root::ImageNvdimm
    }
}

/// The shipped configuration with the guest's root set to `root` (from `file` instead of the
/// installed image or initrd, when given), and each `key = ` line of `replace` set to its value.
fn configuration(root: Root, file: Option<&std::path::Path>, replace: &[(&str, &str)]) -> String {
    let shipped = std::fs::read_to_string(SHIPPED).expect("shipped configuration");
    let default_file = match root {
        Root::Initrd => format!("{ASSETS}/kata-containers-initrd.img"),
        _ => format!("{ASSETS}/kata-containers.img"),
    };
    let file = file
        .map(|f| f.display().to_string())
        .unwrap_or(default_file);
    let (image, initrd) = match root {
        Root::Initrd => (String::new(), file),
        _ => (file, String::new()),
    };
    let mut keys: Vec<(String, String)> = vec![
        ("image".into(), format!("{image:?}")),
        ("initrd".into(), format!("{initrd:?}")),
        (
            "disable_image_nvdimm".into(),
            (root == Root::ImageBlock).to_string(),
        ),
    ];
    keys.extend(replace.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    for line in shipped.lines() {
        let key = line.split(" = ").next().unwrap_or("");
        match keys.iter().find(|(k, _)| k == key) {
            Some((k, v)) if seen.insert(k.clone()) => out.push_str(&format!("{k} = {v}\n")),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, _) in &keys {
        assert!(
            seen.contains(k),
            "the shipped configuration has no {k} line"
        );
    }
    out
}

/// Writes [`configuration`] into `dir` and returns its path.
fn configuration_file(
    dir: &std::path::Path,
    root: Root,
    file: Option<&std::path::Path>,
    replace: &[(&str, &str)],
) -> String {
    let path = dir.join(format!("configuration-{root:?}.toml"));
    std::fs::write(&path, configuration(root, file, replace)).expect("configuration");
    path.display().to_string()
}

mod factory;
mod guest;
mod lifecycle;
mod mounts;
mod observability;
mod resources;
mod security;
