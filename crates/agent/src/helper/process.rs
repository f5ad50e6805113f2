//! The container's process, set up by the helper last: its terminal, rlimits, user, capabilities
//! and no_new_privileges, signals reset, and the exec.

use super::*;

/// Opens a pty in this (the container's) mount namespace, makes the slave our stdio and sends
/// the master to the agent.
pub(super) fn setup_terminal() -> Result<(), GuestError> {
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

pub(super) fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
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

pub(super) fn set_rlimit(r: &PosixRlimit) -> Result<(), GuestError> {
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

pub(super) fn setup_process(p: &Process) -> Result<(), GuestError> {
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

pub(super) fn cap(name: &str) -> Option<caps::Capability> {
    let n = if name.starts_with("CAP_") {
        name.to_string()
    } else {
        format!("CAP_{name}")
    };
    n.parse().ok()
}

/// The program, argv and environment of a process, resolved through its `PATH`.
pub(super) struct Prepared {
    prog: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

pub(super) fn prepare_exec(p: &Process) -> Result<Prepared, GuestError> {
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
pub(super) fn reset_signals() {
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

pub(super) fn exec(p: Prepared) -> GuestError {
    match nix::unistd::execve(&p.prog, &p.argv, &p.envp) {
        Err(e) => step(format!("exec {}", p.prog.to_string_lossy()))(e),
        Ok(never) => match never {},
    }
}

pub(super) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
