//! containerd restarts while a Kata container runs: the shim lives on and containerd reconnects.
//! A test binary of its own, so that the restart cannot disturb other tests.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

const IMAGE: &str = "kata.local/busybox:latest";

fn ctr(sock: &str, args: &[&str]) -> Output {
    Command::new("ctr")
        .arg("-a")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ctr")
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn the_shim_survives_a_containerd_restart() {
    let sock = common::containerd(&["start"]);
    common::import_image(&sock, "default", IMAGE, None);
    let id = "restart-kata";
    let out = ctr(
        &sock,
        &[
            "run",
            "-d",
            "--runtime",
            "io.containerd.kata.v2",
            IMAGE,
            id,
            "sleep",
            "1000",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::containerd(&["stop"]);
    let sock = common::containerd(&["start"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = String::from_utf8_lossy(&ctr(&sock, &["task", "ls"]).stdout).to_string();
        if ls
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "containerd did not reconnect to the shim: {ls}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = ctr(
        &sock,
        &[
            "task",
            "exec",
            "--exec-id",
            "after",
            id,
            "sh",
            "-c",
            "echo still here",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&e.stdout), "still here\n");
    assert!(ctr(&sock, &["task", "kill", "-s", "SIGKILL", id])
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctr(&sock, &["task", "rm", id]).status.success() {
        assert!(Instant::now() < deadline, "task did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&sock, &["container", "rm", id]).status.success());
    std::thread::sleep(Duration::from_secs(1));
    assert!(!Path::new("/run/vc/vm").join(id).exists(), "VM state left");
}
