//! Containers and processes: spawning the helper in new (or existing) namespaces, the guest
//! cgroup of each container, stdio.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};
use tokio::sync::watch;

use crate::helper::HelperConfig;
use crate::reaper::{Exit, Reaper};
use crate::stream::OutputBuffer;

/// Root of the containers' cgroups in the guest.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/kata";

/// Errors with the code the host sees.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// Already exists.
    #[error("{0}")]
    Exists(String),
    /// Failed while doing it.
    #[error("{0}")]
    Failed(String),
    /// A step in the guest failed (its cause kept).
    #[error(transparent)]
    Guest(#[from] crate::error::GuestError),
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        let code = match e {
            AgentError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            AgentError::Exists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::Failed(_) => ttrpc::Code::INTERNAL,
            AgentError::Guest(
                crate::error::GuestError::Invalid(_)
                | crate::error::GuestError::Devcg(crate::devcg::DevcgError::Rule(_))
                | crate::error::GuestError::Seccomp(crate::seccomp::SeccompError::Profile(_)),
            ) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::Guest(_) => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

/// One process (a container's init or an exec).
#[derive(Debug)]
pub struct ProcessEntry {
    /// Pid of the process itself (signals go here).
    pub pid: i32,
    /// Write end of stdin (or the pty master); `None` once closed.
    pub stdin: Mutex<Option<File>>,
    /// Pty master, for resizing.
    pub tty: Option<File>,
    /// stdout (or the pty).
    pub stdout: OutputBuffer,
    /// stderr (closed for a tty).
    pub stderr: OutputBuffer,
    /// Exit.
    pub exit: watch::Receiver<Option<Exit>>,
    /// Start pipe of a created, not yet started init process.
    pub start: Mutex<Option<File>>,
    /// Status pipe, read at start for an exec failure.
    pub status: Mutex<Option<File>>,
    /// WaitProcess has reported the exit.
    pub waited: std::sync::atomic::AtomicBool,
}

impl Drop for ProcessEntry {
    fn drop(&mut self) {
        // Nobody can read this process's output any more: its pump threads must not wait for
        // room in the bounded buffers.
        self.stdout.abandon();
        self.stderr.abandon();
    }
}

impl ProcessEntry {
    /// Closes what an exited process no longer needs (stdin, start and status pipes); the
    /// output streams stay until they are read to the end.
    pub fn exited(&self) {
        self.waited
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for m in [&self.stdin, &self.start, &self.status] {
            m.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// One container.
#[derive(Debug)]
pub struct Container {
    /// Id.
    pub id: String,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
    /// Processes by exec id (the init process under the container id).
    pub processes: Mutex<HashMap<String, Arc<ProcessEntry>>>,
    /// Guest mounts made for it (unmounted on removal, in reverse order).
    pub mounts: Vec<PathBuf>,
    /// Its compiled seccomp filter, applied to its execs too (as runc does).
    pub seccomp: Option<crate::seccomp::Program>,
    /// What guest hooks read on stdin, less `status` and `pid`.
    pub hook_state: serde_json::Value,
    /// The OOM kills of its cgroup already reported by GetOOMEvent (kept with the container,
    /// so a container created again under the same id starts from zero).
    pub oom_reported: std::sync::atomic::AtomicU64,
}

impl Container {
    /// The OCI state for a guest hook.
    pub fn hook_state(&self, status: &str, pid: i32) -> serde_json::Value {
        let mut s = self.hook_state.clone();
        s["status"] = status.into();
        s["pid"] = pid.into();
        s
    }
}

impl Container {
    /// The init process.
    pub fn init(&self) -> Result<Arc<ProcessEntry>, AgentError> {
        self.process(&self.id)
    }

    /// A process by exec id (empty: init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<ProcessEntry>, AgentError> {
        let key = if exec_id.is_empty() {
            self.id.as_str()
        } else {
            exec_id
        };
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!("container {} has no process {key}", self.id))
            })
    }

    /// Forgets exec `exec_id` once its exit was reported and its output read to the end (a
    /// pod's exec probes would otherwise pile up for the container's lifetime). The init
    /// process stays until the container is removed.
    pub fn release_if_done(&self, exec_id: &str) {
        if exec_id.is_empty() || exec_id == self.id {
            return;
        }
        let mut map = self.processes.lock().unwrap_or_else(|e| e.into_inner());
        let done = map.get(exec_id).is_some_and(|p| {
            p.waited.load(std::sync::atomic::Ordering::Relaxed)
                && p.stdout.delivered()
                && p.stderr.delivered()
        });
        if done {
            map.remove(exec_id);
        }
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::Failed(format!("{what}: {e}"))
}

/// Creates a container (its process waits for StartContainer).
pub fn create(
    reaper: &Reaper,
    id: &str,
    spec: Spec,
    mounts: Vec<PathBuf>,
) -> Result<Container, AgentError> {
    let process = spec
        .process()
        .clone()
        .ok_or_else(|| AgentError::Invalid("the OCI spec has no process".into()))?;
    let rootfs = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or_else(|| AgentError::Invalid("the OCI spec has no root.path".into()))?;
    if !rootfs.is_dir() {
        return Err(AgentError::Invalid(format!(
            "root filesystem {} is not a directory in the guest",
            rootfs.display()
        )));
    }
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => {
            let p = crate::seccomp::compile(profile)
                .map_err(|e| AgentError::Invalid(format!("linux.seccomp: {e}")))?;
            if !p.skipped.is_empty() {
                eprintln!(
                    "kata-agent: container {id}: seccomp profile names syscalls x86-64 does not have (skipped, as libseccomp does): {}",
                    p.skipped.join(", ")
                );
            }
            Some(p)
        }
        None => None,
    };
    let hook_state = serde_json::json!({
        "ociVersion": spec.version(),
        "id": id,
        "bundle": rootfs.parent().unwrap_or(&rootfs),
        "annotations": spec.annotations().clone().unwrap_or_default(),
    });
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let cgroup = create_cgroup(id, resources.as_ref())?;
    let flags = clone_flags(&spec);
    let config = HelperConfig {
        spec: Some(spec),
        process,
        rootfs,
        wait_start: true,
        join_pid: None,
        seccomp: seccomp.clone(),
    };
    let entry = match spawn(reaper, &config, flags, &cgroup) {
        Ok(e) => e,
        Err(e) => {
            let _ = std::fs::remove_dir(&cgroup);
            return Err(e);
        }
    };
    let mut processes = HashMap::new();
    processes.insert(id.to_string(), Arc::new(entry));
    Ok(Container {
        id: id.to_string(),
        cgroup,
        processes: Mutex::new(processes),
        mounts,
        seccomp,
        hook_state,
        oom_reported: Default::default(),
    })
}

/// Gets rid of a container that will not be used (a failed guest prestart hook): its processes
/// killed, its cgroup and mounts removed.
pub fn discard(c: &Container) {
    for pid in cgroup_pids(&c.cgroup) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..50 {
        if std::fs::remove_dir(&c.cgroup).is_ok() || !c.cgroup.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for m in c.mounts.iter().rev() {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Starts a created container.
pub fn start(c: &Container) -> Result<(), AgentError> {
    let init = c.init()?;
    let start = init.start.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(mut start) = start else {
        return Err(AgentError::Invalid(format!(
            "container {} is already started",
            c.id
        )));
    };
    start.write_all(b"S").map_err(io("start the container"))?;
    await_exec(&init)
}

/// Runs an extra process in a running container.
pub fn exec(
    reaper: &Reaper,
    c: &Container,
    exec_id: &str,
    process: Process,
) -> Result<i32, AgentError> {
    if c.processes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(exec_id)
    {
        return Err(AgentError::Exists(format!(
            "process {exec_id} already exists in container {}",
            c.id
        )));
    }
    let init = c.init()?;
    if init.exit.borrow().is_some() {
        return Err(AgentError::Invalid(format!(
            "container {} is not running",
            c.id
        )));
    }
    let config = HelperConfig {
        spec: None,
        process,
        rootfs: PathBuf::new(),
        wait_start: false,
        join_pid: Some(init.pid),
        seccomp: c.seccomp.clone(),
    };
    let entry = spawn(reaper, &config, CloneFlags::empty(), &c.cgroup)?;
    await_exec(&entry)?;
    let pid = entry.pid;
    c.processes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(exec_id.to_string(), Arc::new(entry));
    Ok(pid)
}

/// Sets a pty's window size.
pub fn resize(entry: &ProcessEntry, rows: u16, cols: u16) -> Result<(), AgentError> {
    let Some(tty) = &entry.tty else {
        return Err(AgentError::Invalid("the process has no terminal".into()));
    };
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid winsize from a pty master fd we own.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(AgentError::Failed(format!(
            "resize terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

mod cgroup;
mod spawn;

pub use cgroup::{
    apply_resources, cgroup_pids, create_cgroup, oom_kills, prepare_cgroup_root, stats,
};
pub use spawn::await_exec;
use spawn::{clone_flags, spawn};

#[cfg(test)]
mod tests;
