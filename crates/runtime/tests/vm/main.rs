//! A real sandbox: QEMU (TCG here), the project's guest kernel and initrd, virtiofsd, and
//! kata-agent as PID 1. Needs root and `make install` (make test does both).

use kata_config::load::{load_path, FoundBy};
use kata_config::{Config, HostLimits};
use kata_sandbox::{Sandbox, SandboxError};
use oci_spec::runtime::{ProcessBuilder, Spec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
const INSTALLED: &str = "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml";

fn config(extra: &[(&str, &str)]) -> Config {
    let mut c = load_path(Path::new(INSTALLED), FoundBy::CommandLine)
        .expect("installed configuration (run make install)");
    let map: BTreeMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.hypervisor.enable_annotations = vec![".*".into()];
    c.hypervisor.valid_kernel_paths = vec!["/**".into(), "/*".into()];
    c.apply_annotations(&map).expect("annotations");
    c.validate(&HostLimits::current()).expect("valid");
    c
}

/// A root filesystem with busybox and its applets.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .expect("passwd");
    root
}

fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().expect("default process");
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec.set_hostname(Some("kata-test".into()));
    spec
}

fn process(args: &[&str]) -> oci_spec::runtime::Process {
    ProcessBuilder::default()
        .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .build()
        .expect("process")
}

fn processes_named(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(name) {
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let state = stat.rsplit_once(')').map(|(_, r)| r.trim()).unwrap_or("");
                let state: String = state
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ppid ");
                out.push(format!(
                    "{} ({state}): {cmd}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    out
}

fn assert_no_leftovers(id: &str) {
    assert!(
        processes_named(&format!("sandbox-{id}")).is_empty(),
        "QEMU left: {:?}",
        processes_named(&format!("sandbox-{id}"))
    );
    let vfsd = processes_named(&format!(
        "virtiofsd --socket-path /run/vc/vm/{id}/vfsd.sock"
    ));
    assert!(vfsd.is_empty(), "virtiofsd left after {id}: {vfsd:?}");
    assert!(
        !Path::new("/run/vc/vm").join(id).exists(),
        "VM state directory left"
    );
    assert!(
        !Path::new("/run/kata-containers/shared/sandboxes")
            .join(id)
            .exists(),
        "shared directory left"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(id),
        "mounts left: {}",
        mounts
            .lines()
            .filter(|l| l.contains(id))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

async fn read_guest(sb: &Sandbox, cid: &str, exec_id: &str, cmd: &str) -> String {
    sb.exec(cid, exec_id, &process(&["sh", "-c", cmd]))
        .await
        .expect("exec");
    sb.close_stdin(cid, exec_id).await.expect("close");
    let out = sb.read_all(cid, exec_id, false).await.expect("read");
    sb.wait(cid, exec_id).await.expect("wait");
    String::from_utf8_lossy(&out).to_string()
}

/// Runs `script` as a container's init with `edit` applied to the spec; returns (stdout, status).
async fn run_container(
    sb: &Sandbox,
    rootfs: &Path,
    id: &str,
    script: &str,
    edit: impl FnOnce(&mut Spec),
) -> (String, i32) {
    let mut s = spec(&["sh", "-c", script]);
    edit(&mut s);
    sb.create_container(id, s, rootfs, Vec::new())
        .await
        .expect("create");
    sb.close_stdin(id, "").await.expect("close stdin");
    sb.start_container(id).await.expect("start");
    let out = sb.read_all(id, "", false).await.expect("stdout");
    let (status, _) = sb.wait(id, "").await.expect("wait");
    sb.remove_container(id).await.expect("remove");
    (String::from_utf8_lossy(&out).to_string(), status)
}

mod factory;
mod failures;
mod guest;
mod lifecycle;
