//! The pod's shared namespaces when there is no pause container (containerd 2.x's sandbox API:
//! the runtime is asked for the pod itself, and only the application containers run). Asked for
//! by CreateSandbox's `sandbox_pidns` (Kata's meaning: "a pause process needs to be created by
//! the agent; its pid namespace is the pod's"): a holder process, PID 1 of new IPC, UTS and PID
//! namespaces with the pod's hostname, does nothing until the VM powers off. Its namespaces are
//! bind-mounted at [`POD_NS_DIR`]`/{ipc,uts,pid}`, the paths the runtime gives the pod's
//! containers to join (as it gives a pause container's `/proc/<pid>/ns/*` otherwise).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{mount, MsFlags};
use nix::unistd::{fork, ForkResult};

use crate::error::{invalid, step, GuestError};
use crate::reaper::Reaper;

/// Where the pod's namespaces are bound in the guest (the shim's `POD_NAMESPACES_DIR`).
pub const POD_NS_DIR: &str = "/run/kata-containers/sandbox/ns";
/// The agent's argument that runs [`main`].
pub const ARG: &str = "pod-namespaces";

/// `kata-agent pod-namespaces HOSTNAME [KEY=VALUE...]`, started in new IPC, UTS and PID
/// namespaces: sets the hostname and the pod's sysctls, forks the holder (PID 1 of the new PID
/// namespace), prints its pid and exits.
pub fn main() -> ! {
    let hostname = std::env::args().nth(2).unwrap_or_default();
    if !hostname.is_empty() {
        if let Err(e) = nix::unistd::sethostname(&hostname) {
            eprintln!("sethostname {hostname}: {e}");
            std::process::exit(1);
        }
    }
    for kv in std::env::args().skip(3) {
        let (key, value) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        if let Err(e) = crate::helper::write_sysctl(key, value) {
            eprintln!("the pod's {e}");
            std::process::exit(1);
        }
    }
    // SAFETY: this process is single-threaded (freshly exec'd), so fork is safe.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // The holder keeps no pipe of the agent's open, and waits for nothing but the end.
            // SAFETY: plain close(2) of this process's own stdio.
            unsafe {
                libc::close(0);
                libc::close(1);
                libc::close(2);
            }
            // With shareProcessNamespace the pod's orphans are re-parented to this PID 1: an
            // ignored SIGCHLD makes the kernel reap them, so no zombie piles up.
            // SAFETY: SIG_IGN installs no handler.
            if let Err(e) = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGCHLD,
                    nix::sys::signal::SigHandler::SigIgn,
                )
            } {
                eprintln!("SIGCHLD: {e}");
            }
            loop {
                nix::unistd::pause();
            }
        }
        Ok(ForkResult::Parent { child }) => {
            println!("{child}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("fork: {e}");
            std::process::exit(1)
        }
    }
}

/// Starts the holder with `hostname` and `sysctls` and binds its namespaces at [`POD_NS_DIR`].
pub fn start(
    reaper: &Reaper,
    hostname: &str,
    sysctls: &std::collections::HashMap<String, String>,
) -> Result<i32, GuestError> {
    let mut sorted: Vec<_> = sysctls.iter().collect();
    sorted.sort();
    for (key, _) in &sorted {
        crate::helper::sysctl_path(key).map_err(|e| invalid(format!("the pod's {e}")))?;
    }
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(ARG)
        .arg(hostname)
        .args(sorted.iter().map(|(k, v)| format!("{k}={v}")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWPID;
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child and only calls unshare(2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(step("start the pod's namespace holder"))?;
    // Its exit is the reaper's (the agent is PID 1); registered so it is not kept.
    let _exit = reaper.register(child.id() as i32);
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let pid: i32 = out.trim().parse().map_err(|_| {
        GuestError::Missing(format!(
            "the pod's namespace holder did not start: {}",
            if err.trim().is_empty() {
                out.trim()
            } else {
                err.trim()
            }
        ))
    })?;
    bind(pid, Path::new(POD_NS_DIR))?;
    Ok(pid)
}

/// Binds `/proc/<pid>/ns/{ipc,uts,pid}` at `dir/{ipc,uts,pid}`.
fn bind(pid: i32, dir: &Path) -> Result<(), GuestError> {
    std::fs::create_dir_all(dir).map_err(step(format!("create {}", dir.display())))?;
    for ns in ["ipc", "uts", "pid"] {
        let target = dir.join(ns);
        std::fs::File::create(&target).map_err(step(format!("create {}", target.display())))?;
        let source = format!("/proc/{pid}/ns/{ns}");
        mount(
            Some(source.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(format!("bind {source} at {}", target.display())))?;
    }
    Ok(())
}
