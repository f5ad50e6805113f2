//! Starting a container's process: the helper (`kata-agent init-container`) spawned in the
//! container's namespaces, its pid and errors read back over the status pipe, the terminal received
//! over a socket.

use super::*;

pub(super) fn pipe() -> Result<(File, File), AgentError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::Failed(format!("pipe: {e}")))?;
    Ok((File::from(r), File::from(w)))
}

/// Namespaces to create for a new container, from its spec (network and user stay the VM's;
/// those with a path are joined instead).
pub(super) fn clone_flags(spec: &Spec) -> CloneFlags {
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
pub(super) fn spawn(
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
pub(super) fn start_helper(
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
pub(super) fn read_pid(status: &mut impl Read) -> Result<i32, AgentError> {
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
pub(super) fn recv_fd(sock: &File) -> Result<File, crate::error::GuestError> {
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
