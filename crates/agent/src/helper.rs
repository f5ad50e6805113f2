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

/// Opens a pty in this (the container's) mount namespace, makes the slave our stdio and sends
/// the master to the agent.
fn setup_terminal() -> Result<(), GuestError> {
    use nix::fcntl::OFlag;
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let master =
        nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).map_err(step("open /dev/ptmx"))?;
    nix::pty::grantpt(&master).map_err(step("grantpt"))?;
    nix::pty::unlockpt(&master).map_err(step("unlockpt"))?;
    let name = nix::pty::ptsname_r(&master).map_err(step("ptsname"))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(step(format!("open {name}")))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors.
        if unsafe { libc::dup2(slave.as_raw_fd(), fd) } < 0 {
            return Err(last_os_error("dup2 pty"));
        }
    }
    let fds = [master.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"T")];
    sendmsg::<()>(
        TTY_FD,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(step("send the pty to the agent"))?;
    // SAFETY: closing our copy of the socket.
    unsafe { libc::close(TTY_FD) };
    Ok(())
}

fn setup_rootfs(spec: &Spec, rootfs: &Path) -> Result<(), GuestError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make / private"))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step(format!("bind rootfs {}", rootfs.display())))?;
    // Every mount point is resolved inside the root filesystem (an image's symlinks never lead
    // out of it) and mounted through a descriptor.
    let root = kata_mount::open_dir(rootfs).map_err(step(format!(
        "open the root filesystem {}",
        rootfs.display()
    )))?;
    let mut dev_is_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        let fstype = m.typ().clone().unwrap_or_default();
        let source = m
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_default();
        let options = m.options().clone().unwrap_or_default();
        if dest == Path::new("/dev") && fstype == "tmpfs" {
            dev_is_tmpfs = true;
        }
        if fstype == "sysfs" || fstype == "cgroup" || fstype == "cgroup2" {
            // Without a network namespace of its own, sysfs cannot be mounted again: bind the
            // guest's read-only instead.
            let ro = vec![
                "rbind".to_string(),
                "rro".to_string(),
                "nosuid".to_string(),
                "nodev".to_string(),
                "noexec".to_string(),
            ];
            let src = if fstype == "sysfs" {
                "/sys"
            } else {
                "/sys/fs/cgroup"
            };
            // The guest has the unified hierarchy only: a "cgroup" (v1) mount, which a manager
            // on a cgroup v1 host asks for, is the guest's cgroup2, as runc mounts it on a v2
            // host. A fresh mount's root is the cgroup namespace's (the container's own cgroup
            // with a namespace of its own; the guest's whole tree without).
            let (source, fstype) = if fstype == "sysfs" {
                (source, fstype)
            } else {
                ("cgroup".to_string(), "cgroup2".to_string())
            };
            if mount_in(root.as_fd(), &source, dest, &fstype, &options).is_err() {
                mount_in(root.as_fd(), src, dest, "bind", &ro)?;
            }
            continue;
        }
        if source.starts_with(EPHEMERAL_DIR) {
            // A pod's emptyDir in guest memory: made on first use, shared by the pod's containers.
            std::fs::create_dir_all(&source).map_err(step(format!("create emptyDir {source}")))?;
        }
        mount_in(root.as_fd(), &source, dest, &fstype, &options)?;
    }
    if dev_is_tmpfs {
        make_devices(root.as_fd())?;
    }
    if let Some(linux) = spec.linux() {
        let privileged = spec
            .process()
            .as_ref()
            .and_then(|p| p.capabilities().as_ref())
            .and_then(|c| c.bounding().as_ref())
            .is_some_and(|b| b.contains(&oci_spec::runtime::Capability::SysAdmin));
        for d in linux.devices().iter().flatten() {
            spec_device(root.as_fd(), d, privileged)?;
        }
    }
    drop(root);
    std::env::set_current_dir(rootfs).map_err(step(format!("chdir {}", rootfs.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(step(format!("pivot_root {}", rootfs.display())))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach old root"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    if let Some(linux) = spec.linux() {
        // Before /proc/sys is made read-only (runc's order).
        for (key, value) in linux.sysctl().iter().flatten() {
            write_sysctl(key, value)?;
        }
        for path in linux.masked_paths().iter().flatten() {
            mask(Path::new(path))?;
        }
        for path in linux.readonly_paths().iter().flatten() {
            let p = Path::new(path);
            if !p.exists() {
                continue;
            }
            mount(
                Some(p),
                p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(step(format!("bind {path}")))?;
            mount(
                None::<&str>,
                p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(step(format!("make {path} read-only")))?;
        }
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(step("make the root filesystem read-only"))?;
    }
    Ok(())
}

/// Whether a sysctl belongs to a namespace the container has of its own (runc's rule; in the
/// guest, the pod's network namespace is the guest's, so `net.*` is the pod's to set).
pub fn sysctl_allowed(key: &str) -> bool {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    IPC.contains(&key)
        || key.starts_with("fs.mqueue.")
        || key.starts_with("net.")
        || key == "kernel.hostname"
        || key == "kernel.domainname"
}

/// `/proc/sys/<key with / for .>`, refusing what could name another file.
pub fn sysctl_path(key: &str) -> Result<PathBuf, GuestError> {
    if key.is_empty() || key.contains('/') || key.split('.').any(|c| c.is_empty() || c == "..") {
        return Err(invalid(format!("sysctl {key:?} is not a valid name")));
    }
    if !sysctl_allowed(key) {
        return Err(invalid(format!(
            "sysctl {key} is not in a separate kernel namespace of the container (allowed: \
             kernel.msg*, kernel.sem, kernel.shm*, fs.mqueue.*, net.*, kernel.hostname, \
             kernel.domainname)"
        )));
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

pub(crate) fn write_sysctl(key: &str, value: &str) -> Result<(), GuestError> {
    let path = sysctl_path(key)?;
    std::fs::write(&path, value).map_err(step(format!("sysctl {key}={value}")))
}

fn mask(p: &Path) -> Result<(), GuestError> {
    if p.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(step(format!("mask {}", p.display())))
    } else if p.exists() {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(format!("mask {}", p.display())))
    } else {
        Ok(())
    }
}

/// Makes a device of `linux.devices` in the container, as runc does, if the guest has it (the
/// same type and numbers under /sys/dev): a VM has its own devices, not the host's. A device the
/// guest does not have is an error, except in a privileged container, whose spec lists every
/// host device (containerd's `privileged_without_host_devices` avoids that): skipped, said on
/// the console.
fn spec_device(
    root: std::os::fd::BorrowedFd<'_>,
    d: &oci_spec::runtime::LinuxDevice,
    privileged: bool,
) -> Result<(), GuestError> {
    use oci_spec::runtime::LinuxDeviceType as T;
    use std::os::fd::AsRawFd;
    let path = d.path();
    let (kind, sys) = match d.typ() {
        T::C | T::U => (libc::S_IFCHR, "char"),
        T::B => (libc::S_IFBLK, "block"),
        T::P => (libc::S_IFIFO, ""),
        T::A => {
            return Err(invalid(format!(
                "device {}: type a is not a device",
                path.display()
            )))
        }
    };
    let (major, minor) = (d.major() as u32, d.minor() as u32);
    if !sys.is_empty() && !Path::new(&format!("/sys/dev/{sys}/{major}:{minor}")).exists() {
        if privileged {
            let _ = std::fs::write(
                "/dev/kmsg",
                format!(
                    "kata-agent: host device {} ({sys} {major}:{minor}) is not in the VM; skipped for this privileged container\n",
                    path.display()
                ),
            );
            return Ok(());
        }
        return Err(invalid(format!(
            "device {} ({sys} {major}:{minor}) does not exist in the VM: a container gets the guest's devices, not the host's (block volumes: direct-volume; PCI devices: VFIO)",
            path.display()
        )));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| invalid(format!("device path {} has no name", path.display())))?;
    let dir = kata_mount::create_in_root(root, parent, kata_mount::Kind::Dir)
        .map_err(step(format!("device {}", path.display())))?;
    let n = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name))
        .map_err(|_| invalid(format!("device path {} has a NUL byte", path.display())))?;
    let mode = d.file_mode().unwrap_or(0o666) & 0o7777;
    // SAFETY: mknodat(2) relative to a descriptor we own.
    let rc = unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            n.as_ptr(),
            kind | mode,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(step(format!("mknod {}", path.display()))(e));
    }
    // SAFETY: fchmodat(2) and fchownat(2) of the node just made, relative to our descriptor.
    unsafe {
        libc::fchmodat(dir.as_raw_fd(), n.as_ptr(), mode, 0);
        libc::fchownat(
            dir.as_raw_fd(),
            n.as_ptr(),
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    Ok(())
}

/// The devices runc makes in a tmpfs /dev (made below a descriptor of the container's /dev).
fn make_devices(root: std::os::fd::BorrowedFd<'_>) -> Result<(), GuestError> {
    use std::os::fd::AsRawFd;
    let dev = kata_mount::open_in_root(root, Path::new("/dev"))
        .map_err(step("open the container's /dev"))?;
    let c = |s: &str| CString::new(s).unwrap_or_default();
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let n = c(name);
        // SAFETY: mknodat(2) and fchmodat(2) relative to a descriptor we own.
        let rc = unsafe {
            libc::mknodat(
                dev.as_raw_fd(),
                n.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                continue;
            }
            return Err(step(format!("mknod /dev/{name}"))(e));
        }
        // mknod honours the umask; make the mode exact (the node was just made: no symlink).
        unsafe { libc::fchmodat(dev.as_raw_fd(), n.as_ptr(), 0o666, 0) };
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let (n, t) = (c(name), c(target));
        // SAFETY: symlinkat(2) relative to a descriptor we own; EEXIST is fine.
        unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), n.as_ptr()) };
    }
    Ok(())
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

fn set_rlimit(r: &PosixRlimit) -> Result<(), GuestError> {
    let name = serde_json::to_value(r.typ())
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let res = rlimit_resource(&name).ok_or_else(|| invalid(format!("unknown rlimit {name}")))?;
    let lim = libc::rlimit {
        rlim_cur: r.soft(),
        rlim_max: r.hard(),
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(res, &lim) } != 0 {
        return Err(last_os_error(format!("setrlimit {name}")));
    }
    Ok(())
}

fn setup_process(p: &Process) -> Result<(), GuestError> {
    nix::unistd::setsid().map_err(step("setsid"))?;
    if p.terminal().unwrap_or(false) {
        // SAFETY: TIOCSCTTY on stdin, which is the pty slave.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(last_os_error("set controlling terminal"));
        }
    }
    for r in p.rlimits().iter().flatten() {
        set_rlimit(r)?;
    }
    if let Some(c) = p.capabilities() {
        // Drop from the bounding set while still privileged.
        let keep: caps::CapsHashSet = c
            .bounding()
            .iter()
            .flatten()
            .filter_map(|c| cap(&c.to_string()))
            .collect();
        for all in caps::all() {
            if !keep.contains(&all) {
                let _ = caps::drop(None, caps::CapSet::Bounding, all);
            }
        }
    }
    let user = p.user();
    // SAFETY: PR_SET_KEEPCAPS keeps permitted capabilities across setuid.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let gids: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(step("setgroups"))?;
    nix::unistd::setresgid(user.gid().into(), user.gid().into(), user.gid().into())
        .map_err(step(format!("setgid {}", user.gid())))?;
    nix::unistd::setresuid(user.uid().into(), user.uid().into(), user.uid().into())
        .map_err(step(format!("setuid {}", user.uid())))?;
    if let Some(c) = p.capabilities() {
        let set = |list: &Option<oci_spec::runtime::Capabilities>| -> caps::CapsHashSet {
            list.iter()
                .flatten()
                .filter_map(|c| cap(&c.to_string()))
                .collect()
        };
        // Shrink in an order the kernel accepts: inheritable while the permitted set is
        // still full, effective before permitted (effective must stay within permitted).
        caps::set(None, caps::CapSet::Inheritable, &set(c.inheritable()))
            .map_err(step("set inheritable capabilities"))?;
        caps::set(None, caps::CapSet::Effective, &set(c.effective()))
            .map_err(step("set effective capabilities"))?;
        caps::set(None, caps::CapSet::Permitted, &set(c.permitted()))
            .map_err(step("set permitted capabilities"))?;
        let _ = caps::set(None, caps::CapSet::Ambient, &set(c.ambient()));
    } else if user.uid() != 0 {
        let _ = caps::clear(None, caps::CapSet::Effective);
        let _ = caps::clear(None, caps::CapSet::Permitted);
    }
    if p.no_new_privileges().unwrap_or(false) {
        // SAFETY: sets a per-process flag.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(last_os_error("no_new_privileges"));
        }
    }
    let cwd = p.cwd();
    std::env::set_current_dir(cwd).map_err(step(format!("chdir {}", cwd.display())))?;
    Ok(())
}

fn cap(name: &str) -> Option<caps::Capability> {
    let n = if name.starts_with("CAP_") {
        name.to_string()
    } else {
        format!("CAP_{name}")
    };
    n.parse().ok()
}

/// The program, argv and environment of a process, resolved through its `PATH`.
struct Prepared {
    prog: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

fn prepare_exec(p: &Process) -> Result<Prepared, GuestError> {
    let args = p.args().clone().unwrap_or_default();
    let Some(program) = args.first() else {
        return Err(invalid("the process has no args"));
    };
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .to_string();
    let resolved = if program.contains('/') {
        PathBuf::from(program)
    } else {
        match path
            .split(':')
            .map(|d| Path::new(d).join(program))
            .find(|c| is_executable(c))
        {
            Some(p) => p,
            None => {
                return Err(invalid(format!(
                    "executable file {program:?} not found in $PATH ({path})"
                )))
            }
        }
    };
    let c = |s: &str| CString::new(s).map_err(|_| invalid(format!("{s:?} contains a NUL byte")));
    Ok(Prepared {
        prog: c(&resolved.display().to_string())?,
        argv: args.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
        envp: env.iter().map(|e| c(e)).collect::<Result<_, _>>()?,
    })
}

/// Every catchable signal back to its default action, and an empty signal mask.
fn reset_signals() {
    for n in 1..=libc::SIGRTMAX() {
        if n == libc::SIGKILL || n == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting a signal's action to SIG_DFL involves no handler code.
        unsafe {
            libc::signal(n, libc::SIG_DFL);
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

fn exec(p: Prepared) -> GuestError {
    match nix::unistd::execve(&p.prog, &p.argv, &p.envp) {
        Err(e) => step(format!("exec {}", p.prog.to_string_lossy()))(e),
        Ok(never) => match never {},
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_of_the_containers_namespaces_only() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").expect("net"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("kernel.shm_rmid_forced").expect("ipc"),
            PathBuf::from("/proc/sys/kernel/shm_rmid_forced")
        );
        sysctl_path("fs.mqueue.msg_max").expect("mqueue");
        for refused in ["kernel.panic", "vm.overcommit_memory", "fs.file-max"] {
            let e = sysctl_path(refused).expect_err(refused);
            assert!(
                e.to_string().contains("not in a separate kernel namespace"),
                "{e}"
            );
        }
        for bad in ["", "net..x", "net./../x", "net.ipv4/../../x", "net.."] {
            assert!(sysctl_path(bad).is_err(), "{bad:?}");
        }
    }
}
