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

fn pipe() -> Result<(File, File), AgentError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::Failed(format!("pipe: {e}")))?;
    Ok((File::from(r), File::from(w)))
}

fn io(what: &str) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::Failed(format!("{what}: {e}"))
}

/// Namespaces to create for a new container, from its spec (network and user stay the VM's;
/// those with a path are joined instead).
fn clone_flags(spec: &Spec) -> CloneFlags {
    let mut flags = CloneFlags::CLONE_NEWNS;
    for ns in crate::helper::spec_namespaces(spec) {
        if ns.path().is_some() {
            continue; // joined by the helper (a pod's shared namespace)
        }
        flags |= match ns.typ() {
            LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
            _ => CloneFlags::empty(),
        };
    }
    flags
}

/// Spawns the helper and returns the process once the helper reported the pid (and, for a new
/// container, once it is ready to start).
/// `unshare`: the namespaces to create (empty for an exec, which joins them in the helper).
fn spawn(
    reaper: &Reaper,
    config: &HelperConfig,
    unshare: CloneFlags,
    cgroup: &Path,
) -> Result<ProcessEntry, AgentError> {
    let terminal = config.process.terminal().unwrap_or(false);
    let (cfg_r, mut cfg_w) = pipe()?;
    let (mut status_r, status_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let mut stdin = None;
    let (mut stdout, mut stderr) = (OutputBuffer::closed(), OutputBuffer::closed());
    // For a terminal, the child opens the pty inside the container and sends the master back
    // over a socket (the helper's fd 6); otherwise the helper's stdio are pipes.
    let (tty_pair, child_stdio) = if terminal {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| AgentError::Failed(format!("socketpair: {e}")))?;
        (Some((File::from(a), File::from(b))), None)
    } else {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        stdout = OutputBuffer::pump(out_r);
        stderr = OutputBuffer::pump(err_r);
        stdin = Some(in_w);
        (None, Some([in_r, out_w, err_w]))
    };
    let mut handed = None;
    if let Some(spare) = crate::spare::take() {
        let mut fds = vec![cfg_r.as_raw_fd(), status_w.as_raw_fd(), start_r.as_raw_fd()];
        match (&tty_pair, &child_stdio) {
            (Some((_, child_end)), _) => fds.push(child_end.as_raw_fd()),
            (None, Some(stdio)) => fds.extend(stdio.iter().map(|f| f.as_raw_fd())),
            (None, None) => {}
        }
        match spare.hand_over(&fds, unshare) {
            Ok(pid) => handed = Some(pid),
            Err(e) => crate::init::debug(|| format!("spare helper unusable: {e}")),
        }
    }
    let helper_pid = match handed {
        Some(pid) => {
            // The helper has its copies: the agent must not keep the write ends open.
            drop(child_stdio);
            pid
        }
        None => start_helper(
            [&cfg_r, &status_w, &start_r],
            tty_pair.as_ref().map(|(_, b)| b),
            child_stdio,
            unshare,
        )?,
    };

    let exit = reaper.register(helper_pid);
    crate::init::debug(|| format!("helper pid {helper_pid}"));
    drop(status_w);
    drop(start_r);
    drop(cfg_r);
    // The helper joins the container's cgroup before it forks the process: a container whose
    // limits cannot apply must not run unlimited.
    if let Err(e) = std::fs::write(cgroup.join("cgroup.procs"), helper_pid.to_string()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(helper_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        return Err(AgentError::Failed(format!(
            "cannot put the container's process into its cgroup {}: {e}",
            cgroup.display()
        )));
    }
    let json = serde_json::to_vec(config)
        .map_err(|e| AgentError::Failed(format!("encode helper config: {e}")))?;
    cfg_w
        .write_all(&json)
        .map_err(io("send the helper its configuration"))?;
    drop(cfg_w);
    let pid = read_pid(&mut status_r)?;
    crate::init::debug(|| format!("helper {helper_pid}: process {pid} forked"));
    let mut tty = None;
    if let Some((agent_end, child_end)) = tty_pair {
        drop(child_end);
        let master = recv_fd(&agent_end).map_err(|e| {
            let mut rest = String::new();
            let _ = status_r.read_to_string(&mut rest);
            if rest.is_empty() {
                AgentError::Guest(e)
            } else {
                AgentError::Failed(rest.trim_start_matches('E').to_string())
            }
        })?;
        stdout = OutputBuffer::pump(master.try_clone().map_err(io("dup pty"))?);
        stdin = Some(master.try_clone().map_err(io("dup pty"))?);
        tty = Some(master);
    }
    if config.wait_start {
        let mut b = [0u8; 1];
        match status_r.read(&mut b) {
            Ok(1) if b[0] == b'R' => {
                crate::init::debug(|| format!("process {pid}: ready to start"));
            }
            _ => {
                let mut rest = String::new();
                let _ = status_r.read_to_string(&mut rest);
                return Err(AgentError::Failed(format!(
                    "create container: {}",
                    rest.trim_start_matches('E')
                )));
            }
        }
    }
    // A new spare, now that this process is ready (not competing with it for the vCPU).
    crate::spare::refill_later();
    Ok(ProcessEntry {
        pid,
        stdin: Mutex::new(stdin),
        tty,
        stdout,
        stderr,
        exit,
        start: Mutex::new(config.wait_start.then_some(start_w)),
        status: Mutex::new(Some(status_r)),
        waited: std::sync::atomic::AtomicBool::new(false),
    })
}

/// Starts a helper on demand (no spare was ready): `/proc/self/exe init-container` with the
/// pipes on fds 3-5, the terminal socket on 6 or the stdio pipes on 0-2, in the new namespaces.
fn start_helper(
    pipes: [&File; 3],
    tty_child: Option<&File>,
    stdio: Option<[File; 3]>,
    unshare: CloneFlags,
) -> Result<i32, AgentError> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("kata-agent-init").arg("init-container");
    match stdio {
        Some([i, o, e]) => {
            cmd.stdin(Stdio::from(i))
                .stdout(Stdio::from(o))
                .stderr(Stdio::from(e));
        }
        None => {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
    }
    let tty_child_fd = tty_child.map(|f| f.as_raw_fd()).unwrap_or(-1);
    let fds = [
        pipes[0].as_raw_fd(),
        pipes[1].as_raw_fd(),
        pipes[2].as_raw_fd(),
    ];
    // SAFETY: the closure runs in the forked child and only makes async-signal-safe calls
    // (dup2, unshare).
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if tty_child_fd >= 0 && libc::dup2(tty_child_fd, 6) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if !unshare.is_empty() && libc::unshare(unshare.bits()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io("start the container helper"))?;
    Ok(child.id() as i32)
}

/// Reads the helper's first message: the forked process's pid, or the helper's error (see
/// [`crate::helper::pid_message`]).
fn read_pid(status: &mut impl Read) -> Result<i32, AgentError> {
    let mut tag = [0u8; 1];
    match status.read_exact(&mut tag) {
        Ok(()) if tag[0] == b'P' => {
            let mut b = [0u8; 4];
            status
                .read_exact(&mut b)
                .map_err(io("read the process's pid from the helper"))?;
            Ok(u32::from_le_bytes(b) as i32)
        }
        Ok(()) => {
            let mut rest = String::new();
            let _ = status.read_to_string(&mut rest);
            let msg = if tag[0] == b'E' {
                rest
            } else {
                String::from_utf8_lossy(&tag).to_string() + &rest
            };
            Err(AgentError::Failed(msg))
        }
        Err(e) => Err(AgentError::Failed(format!(
            "the container helper exited before it reported a pid: {e}"
        ))),
    }
}

/// Receives one file descriptor sent with SCM_RIGHTS.
fn recv_fd(sock: &File) -> Result<File, crate::error::GuestError> {
    use crate::error::{invalid, step};
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(step("receive the pty"))?;
    for c in msg.cmsgs().map_err(step("receive the pty"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just gave us this descriptor.
                return Ok(unsafe { File::from_raw_fd(*fd) });
            }
        }
    }
    Err(invalid("the container process did not send its terminal"))
}

/// Reads the status pipe after the start byte: EOF means exec succeeded.
pub fn await_exec(entry: &ProcessEntry) -> Result<(), AgentError> {
    let Some(mut status) = entry
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return Ok(());
    };
    let mut rest = String::new();
    let _ = status.read_to_string(&mut rest);
    if rest.is_empty() {
        Ok(())
    } else {
        Err(AgentError::Failed(rest.trim_start_matches('E').to_string()))
    }
}

/// Creates the cgroup of a container and applies its limits.
pub fn create_cgroup(id: &str, resources: Option<&LinuxResources>) -> Result<PathBuf, AgentError> {
    let root = prepare_cgroup_root()?;
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).map_err(io("create the container's cgroup"))?;
    if let Some(r) = resources {
        let applied = apply_resources(&dir, r).and_then(|_| apply_devices(&dir, r));
        if let Err(e) = applied {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    }
    Ok(dir)
}

/// The container's device rules as a BPF program on its cgroup (see [`crate::devcg`]).
fn apply_devices(dir: &Path, r: &LinuxResources) -> Result<(), AgentError> {
    let Some(list) = r.devices().as_ref().filter(|l| !l.is_empty()) else {
        return Ok(());
    };
    let mut rules = crate::devcg::rules(list).map_err(|e| AgentError::Guest(e.into()))?;
    // As runc: its standard devices are allowed whatever the spec says.
    rules.extend(crate::devcg::runc_defaults());
    let fd = std::fs::File::open(dir).map_err(io("open the container's cgroup"))?;
    use std::os::fd::AsFd;
    crate::devcg::attach(&crate::devcg::assemble(&rules), fd.as_fd())
        .map_err(|e| AgentError::Guest(e.into()))
}

/// Creates the containers' parent cgroup with every controller enabled for its children. The
/// agent does it once at start, off the path of the first container create (enabling the
/// controllers costs tens of ms under TCG); later calls find it done.
pub fn prepare_cgroup_root() -> Result<&'static Path, AgentError> {
    static READY: Mutex<bool> = Mutex::new(false);
    let root = Path::new(CGROUP_ROOT);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if !*ready {
        std::fs::create_dir_all(root).map_err(io("create the containers' cgroup"))?;
        if let Ok(ctrl) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let enable: Vec<String> = ctrl.split_whitespace().map(|c| format!("+{c}")).collect();
            let _ = std::fs::write(root.join("cgroup.subtree_control"), enable.join(" "));
        }
        *ready = true;
    }
    Ok(root)
}

/// Writes OCI resources into a cgroup v2 directory.
pub fn apply_resources(dir: &Path, r: &LinuxResources) -> Result<(), AgentError> {
    let write = |file: &str, value: String| {
        std::fs::write(dir.join(file), &value)
            .map_err(|e| AgentError::Failed(format!("set {file} = {value}: {e}")))
    };
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            write(
                "memory.max",
                if limit < 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            )?;
        }
        if let Some(swap) = m.swap() {
            if let Some(limit) = m.limit() {
                if swap > 0 && limit > 0 && swap >= limit {
                    let _ = write("memory.swap.max", (swap - limit).to_string());
                }
            }
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(q) = c.quota() {
            let period = c.period().unwrap_or(100_000);
            write(
                "cpu.max",
                if q <= 0 {
                    format!("max {period}")
                } else {
                    format!("{q} {period}")
                },
            )?;
        }
        if let Some(shares) = c.shares() {
            // cgroup v1 shares (2..262144) to v2 weight (1..10000), as runc converts.
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            write("cpu.weight", weight.to_string())?;
        }
    }
    if let Some(p) = r.pids() {
        let l = p.limit();
        write(
            "pids.max",
            if l <= 0 { "max".into() } else { l.to_string() },
        )?;
    }
    Ok(())
}

fn read_u64(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Statistics of a container's cgroup.
pub fn stats(dir: &Path) -> kata_protocols::agent::StatsContainerResponse {
    let limit = std::fs::read_to_string(dir.join("memory.max"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    let oom_kills = keyed(dir, "memory.events", "oom_kill ");
    kata_protocols::agent::StatsContainerResponse {
        memory_usage: read_u64(dir, "memory.current"),
        memory_limit: limit,
        cpu_usage_usec: keyed(dir, "cpu.stat", "usage_usec "),
        pids_current: read_u64(dir, "pids.current"),
        oom_killed: oom_kills > 0,
        oom_kills,
        ..Default::default()
    }
}

/// Pids in a cgroup.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pid_reads_back_as_a_pid_even_one_whose_low_byte_is_e() {
        for pid in [1, 69, 325, 0x4545, 4_194_304] {
            let msg = crate::helper::pid_message(pid);
            assert_eq!(read_pid(&mut &msg[..]).expect("pid"), pid);
        }
    }

    #[test]
    fn a_helper_error_reads_back_as_its_message() {
        let e = read_pid(&mut &b"Epivot_root /x: EINVAL"[..]).expect_err("error");
        assert_eq!(e.to_string(), "pivot_root /x: EINVAL");
        let e = read_pid(&mut &b""[..]).expect_err("eof");
        assert!(
            e.to_string().contains("exited before it reported a pid"),
            "{e}"
        );
        let e = read_pid(&mut &b"P\x01"[..]).expect_err("short");
        assert!(e.to_string().contains("pid"), "{e}");
    }
}
