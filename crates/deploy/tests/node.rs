//! kata-deploy on a real node: a containerd (Debian's 1.6) of the test's own, with a version 2
//! configuration and a restart script, gets the payload of this build (`/opt/kata`, installed by
//! `make install`) from `kata-deploy install`; a container then runs in a VM from the installed
//! release; an install killed by SIGKILL while copying is finished by the next one; `uninstall`
//! gives back the configuration's bytes and leaves nothing of the payload.
//! Needs root, containerd, QEMU and `make install` (make test provides all of them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PREFIX: &str = "/opt/kata-deploy-test";
const IMAGE: &str = "kata.local/busybox:latest";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch containerd: its configuration (version 2, the CRI plugin on) and a restart script
/// that stops the running one (by its pid file) and starts it again, as `systemctl restart`.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join("kata-deploy-node");
        let s = Scratch { dir };
        s.stop();
        let _ = std::fs::remove_dir_all(&s.dir);
        std::fs::create_dir_all(s.dir.join("net.d")).expect("mkdir");
        let d = s.dir.display();
        std::fs::write(
            s.config(),
            format!(
                "# The node's containerd (a test's).\nversion = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"kata.local/pause:3.6\"\n  \
                 stream_server_port = \"0\"\n  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    \
                 bin_dir = \"/usr/lib/cni\"\n    conf_dir = \"{d}/net.d\"\n"
            ),
        )
        .expect("config");
        std::fs::write(
            s.dir.join("restart.sh"),
            format!(
                "#!/bin/sh\nif [ -f {d}/pid ]; then kill $(cat {d}/pid) 2>/dev/null; \
                 while kill -0 $(cat {d}/pid) 2>/dev/null; do sleep 0.1; done; fi\n\
                 setsid containerd --config {d}/config.toml >>{d}/containerd.log 2>&1 < /dev/null &\n\
                 echo $! > {d}/pid\n"
            ),
        )
        .expect("restart script");
        run(Command::new("chmod")
            .arg("+x")
            .arg(s.dir.join("restart.sh")));
        s
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn stop(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{}", pid.trim())).exists() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn deploy(&self, verb: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kata-deploy"));
        c.arg(verb)
            .args(["--host-root", "/", "--prefix", PREFIX])
            .arg("--containerd-config")
            .arg(self.config())
            .arg("--containerd-socket")
            .arg(self.socket())
            .arg("--restart")
            .arg(self.dir.join("restart.sh"))
            .args(extra);
        c
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.socket());
        c
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .output();
    }
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn install_run_a_vm_interrupted_install_and_uninstall_on_a_real_containerd() {
    let node = Scratch::new();
    // The payload of this build, as the image carries it.
    let payload = node.dir.join("payload");
    std::fs::create_dir_all(&payload).expect("mkdir");
    run(Command::new("cp")
        .arg("-a")
        .arg("/opt/kata")
        .arg(payload.join("kata")));
    run(Command::new(env!("CARGO_BIN_EXE_kata-deploy"))
        .arg("manifest")
        .arg(&payload));
    run(&mut Command::new(node.dir.join("restart.sh")));
    let original = std::fs::read(node.config()).expect("config");

    // An install killed while it copies the payload.
    let mut killed = node
        .deploy("install", &["--release", "r1"])
        .arg("--payload")
        .arg(&payload)
        .stderr(Stdio::null())
        .spawn()
        .expect("kata-deploy");
    std::thread::sleep(Duration::from_millis(150));
    let _ = killed.kill();
    let _ = killed.wait();
    // containerd still runs and the configuration still loads.
    run(node.ctr().arg("version"));

    // The install again, whole.
    let t = Instant::now();
    run(node
        .deploy("install", &["--release", "r1"])
        .arg("--payload")
        .arg(&payload));
    eprintln!("kata-deploy install: {:?}", t.elapsed());
    let status = run(&mut node.deploy("status", &[]));
    assert!(status.contains("release: r1"), "{status}");
    assert!(status.contains("kata, kata-qemu"), "{status}");
    let edited = std::fs::read_to_string(node.config()).expect("config");
    assert!(
        edited.starts_with("# The node's containerd (a test's).\nversion = 2\n"),
        "{edited}"
    );
    assert!(edited.contains(&format!(
        "runtime_path = \"{PREFIX}/bin/containerd-shim-kata-v2\""
    )));

    // A container in a VM from the installed release.
    let tar = node.dir.join("busybox.tar");
    run(Command::new(repo().join("scripts/busybox-image.sh"))
        .arg(&tar)
        .arg(IMAGE));
    run(node.ctr().args(["images", "import"]).arg(&tar));
    let out = run(node.ctr().args([
        "run",
        "--rm",
        "--runtime",
        &format!("{PREFIX}/bin/containerd-shim-kata-v2"),
        "--runtime-config-path",
        &format!("{PREFIX}/share/defaults/kata-containers/configuration.toml"),
        IMAGE,
        "kata-deploy-test",
        "uname",
        "-r",
    ]));
    let host_kernel = run(Command::new("uname").arg("-r"));
    assert!(
        !out.trim().is_empty() && out.trim() != host_kernel.trim(),
        "the container ran on the host's kernel: {out}"
    );
    // A sandbox runs from the release's own files, not through the prefix's link.
    assert!(Path::new(&format!("{PREFIX}-releases/r1/bin")).exists());

    // Uninstall: the configuration's bytes back, the payload gone, containerd running.
    run(&mut node.deploy("uninstall", &[]));
    assert_eq!(std::fs::read(node.config()).expect("config"), original);
    assert!(!Path::new(PREFIX).exists() && !Path::new(&format!("{PREFIX}-releases")).exists());
    run(node.ctr().arg("version"));
    // Again: nothing to do, still fine.
    run(&mut node.deploy("uninstall", &[]));
}
