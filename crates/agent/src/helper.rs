//! `kata-agent init-container`: a short-lived, single-threaded helper that the agent starts
//! inside the container's new namespaces (or, for exec, inside an existing container's). It
//! forks the container process, which prepares the root filesystem, mounts, user and
//! capabilities, waits for the start signal and execs.
//!
//! File descriptors: 0-2 the process's stdio; 3 the configuration (JSON, read to EOF); 4 the
//! status pipe (the helper writes `P` and the child's pid as 4 little-endian bytes, then the child
//! writes `R` once ready, or `E<message>` on failure; exec closes it); 5 the start pipe (create
//! only: one byte starts the process); 6, for a terminal, a unix socket on which the child sends
//! the pty master it opened inside the container (so the pty belongs to the container's own
//! /dev/pts). A helper started ahead of time (`init-container --spare`, see [`crate::spare`])
//! first receives these descriptors over a socket on fd 3. The helper then waits for the child and exits the same way (code, or the same
//! signal).

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use oci_spec::runtime::{PosixRlimit, Process, Spec};
use serde::{Deserialize, Serialize};

use std::os::fd::AsFd;

use crate::error::{invalid, last_os_error, step, GuestError};
use crate::mounts::mount_in;

/// What the helper is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperConfig {
    /// Full spec for a new container; `None` for an exec into a running one.
    pub spec: Option<Spec>,
    /// The process to run.
    pub process: Process,
    /// Guest path of the container's root filesystem (new containers).
    pub rootfs: PathBuf,
    /// Wait for the start byte on fd 5 before exec.
    pub wait_start: bool,
    /// Join the namespaces of this pid (exec into a running container).
    pub join_pid: Option<i32>,
    /// The container's seccomp filter (compiled by the agent).
    #[serde(default)]
    pub seccomp: Option<crate::seccomp::Program>,
}

/// Enters the ipc, uts, pid, cgroup and mount namespaces of `pid` (pid: for children).
fn join_namespaces(pid: i32) -> Result<(), GuestError> {
    use std::os::fd::AsFd;
    let files: Vec<(&str, File)> = ["ipc", "uts", "pid", "cgroup", "mnt"]
        .iter()
        .map(|ns| {
            File::open(format!("/proc/{pid}/ns/{ns}"))
                .map(|f| (*ns, f))
                .map_err(step(format!("open /proc/{pid}/ns/{ns}")))
        })
        .collect::<Result<_, _>>()?;
    for (ns, f) in &files {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::empty())
            .map_err(step(format!("join the {ns} namespace of {pid}")))?;
    }
    Ok(())
}

/// The namespaces a spec lists.
pub fn spec_namespaces(spec: &Spec) -> Vec<oci_spec::runtime::LinuxNamespace> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
}

/// Joins the namespaces a new container's spec gives by path (in a pod: the sandbox
/// container's ipc, uts or pid namespace in the guest).
fn join_spec_namespaces(spec: &Spec) -> Result<(), GuestError> {
    use std::os::fd::AsFd;
    for ns in spec_namespaces(spec) {
        let Some(path) = ns.path() else { continue };
        let f = File::open(path).map_err(step(format!("open namespace {}", path.display())))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::empty())
            .map_err(step(format!("join namespace {}", path.display())))?;
    }
    Ok(())
}

/// Whether the spec asks for a cgroup namespace of its own (Docker's `--cgroupns private`, the
/// default of Docker and containerd's CRI on cgroup v2 hosts).
pub fn wants_cgroup_namespace(spec: &Spec) -> bool {
    spec_namespaces(spec)
        .iter()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup && n.path().is_none())
}

/// Guest directory of a pod's emptyDir volumes (the shim's `GUEST_EPHEMERAL_DIR`).
const EPHEMERAL_DIR: &str = "/run/kata-containers/sandbox/ephemeral/";
const CONFIG_FD: RawFd = 3;
const STATUS_FD: RawFd = 4;
const START_FD: RawFd = 5;
const TTY_FD: RawFd = 6;

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Entry point of `kata-agent init-container`. Never returns.
pub fn main() -> ! {
    if std::env::args().nth(2).as_deref() == Some(crate::spare::SPARE_ARG) {
        // Started ahead of time: wait for the descriptors and namespaces of a container.
        if let Err(e) = crate::spare::receive() {
            let _ = std::fs::write("/dev/kmsg", format!("kata-agent-init: spare helper: {e}\n"));
            std::process::exit(127);
        }
    }
    // SAFETY: fds 3 and 4 are handed to us by the agent and owned by this process.
    let mut config_file = unsafe { File::from_raw_fd(CONFIG_FD) };
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    let mut text = String::new();
    if let Err(e) = config_file.read_to_string(&mut text) {
        fail(&mut status, &format!("read helper configuration: {e}"));
    }
    drop(config_file);
    let config: HelperConfig = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => fail(&mut status, &format!("parse helper configuration: {e}")),
    };
    if let Some(pid) = config.join_pid {
        if let Err(e) = join_namespaces(pid) {
            fail(&mut status, &e.to_string());
        }
    }
    if let Some(spec) = &config.spec {
        if let Err(e) = join_spec_namespaces(spec) {
            fail(&mut status, &e.to_string());
        }
        // A cgroup namespace is made here, not with the others at the helper's start: the
        // agent has moved this process into the container's cgroup by now (before it sent the
        // configuration), so that cgroup becomes the namespace's root, as with runc.
        if wants_cgroup_namespace(spec) {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP) {
                fail(&mut status, &format!("unshare the cgroup namespace: {e}"));
            }
        }
    }
    // SAFETY: this process is single-threaded (freshly exec'd), so fork is safe.
    match unsafe { fork() } {
        Err(e) => fail(&mut status, &format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            let err = child(&config, &mut status);
            fail(&mut status, &err.to_string())
        }
        Ok(ForkResult::Parent { child }) => {
            CHILD.store(child.as_raw(), std::sync::atomic::Ordering::Relaxed);
            let _ = status.write_all(&pid_message(child.as_raw()));
            drop(status);
            // SAFETY: installing a handler that only calls kill.
            for sig in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGQUIT,
                Signal::SIGUSR1,
                Signal::SIGUSR2,
                Signal::SIGWINCH,
                Signal::SIGCONT,
            ] {
                unsafe {
                    let _ = signal(sig, SigHandler::Handler(forward));
                }
            }
            mirror_exit(child)
        }
    }
}

fn mirror_exit(child: Pid) -> ! {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // SAFETY: restoring the default action, then dying of the same signal.
                unsafe {
                    let _ = signal(sig, SigHandler::SigDfl);
                }
                let _ = kill(Pid::this(), sig);
                std::process::exit(128 + sig as i32)
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => std::process::exit(255),
        }
    }
}

/// What the helper writes on its status pipe once the process is forked: `P` and the pid
/// (little-endian u32). A failure is `E` and a message instead. The tag comes first so that no
/// pid can be mistaken for an error (a bare pid whose low byte is 69 is an `E`).
pub fn pid_message(pid: i32) -> [u8; 5] {
    let b = (pid as u32).to_le_bytes();
    [b'P', b[0], b[1], b[2], b[3]]
}

fn fail(status: &mut File, msg: &str) -> ! {
    let _ = status.write_all(format!("E{msg}").as_bytes());
    std::process::exit(127)
}

/// Runs in the container's first process. Returns only on error.
fn child(config: &HelperConfig, status: &mut File) -> GuestError {
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a flag on this process; fcntl marks the
    // helper's pipes close-on-exec so the container never inherits them.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(START_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(TTY_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    if let Some(spec) = &config.spec {
        if let Err(e) = setup_rootfs(spec, &config.rootfs) {
            return e;
        }
        if let Some(h) = spec.hostname() {
            if let Err(e) = nix::unistd::sethostname(h) {
                return step(format!("sethostname {h}"))(e);
            }
        }
    }
    let p = &config.process;
    if p.terminal().unwrap_or(false) {
        if let Err(e) = setup_terminal() {
            return e;
        }
    }
    // The process starts with every signal at its default action and none blocked, as with
    // runc: this helper is a Rust program, whose runtime ignores SIGPIPE, and an ignored signal
    // survives execve (a `yes | head` would spin forever on EPIPE instead of dying). Done
    // before the seccomp filter, which may forbid rt_sigaction.
    reset_signals();
    // As runc: without no_new_privileges the filter goes in while the process still has
    // CAP_SYS_ADMIN (so the profile must allow what remains: setuid, capset, execve...); with
    // it, as late as possible, right before execve.
    let nnp = p.no_new_privileges().unwrap_or(false);
    if let (Some(filter), false) = (&config.seccomp, nnp) {
        if let Err(e) = crate::seccomp::install(filter) {
            return e.into();
        }
    }
    if let Err(e) = setup_process(p) {
        return e;
    }
    if config.wait_start {
        if status.write_all(b"R").is_err() {
            return invalid("status pipe closed");
        }
        // SAFETY: fd 5 is the start pipe handed to us by the agent.
        let mut start = unsafe { File::from_raw_fd(START_FD) };
        let mut b = [0u8; 1];
        match start.read(&mut b) {
            Ok(1) => {}
            _ => std::process::exit(0), // the container was deleted before it started
        }
    }
    let prepared = match prepare_exec(p) {
        Ok(x) => x,
        Err(e) => return e,
    };
    if let (Some(filter), true) = (&config.seccomp, nnp) {
        if let Err(e) = crate::seccomp::install(filter) {
            return e.into();
        }
    }
    exec(prepared)
}

mod process;
mod rootfs;

use process::{exec, prepare_exec, reset_signals, setup_process, setup_terminal};
use rootfs::setup_rootfs;
pub use rootfs::sysctl_path;
pub(crate) use rootfs::write_sysctl;

#[cfg(test)]
mod tests;
