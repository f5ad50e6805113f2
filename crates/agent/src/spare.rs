//! A spare container helper, started ahead of time.
//!
//! Starting `kata-agent init-container` costs a fork of the (multi-threaded) agent, an exec and
//! the new process's start-up: about 70 ms of a container create or exec under TCG. The agent
//! keeps one helper started and idle, blocked on a unix socket; a create or exec hands it its
//! descriptors and the namespaces to create with one `sendmsg`, and a new spare is started in
//! the background. The helper then behaves exactly as one started on demand (see
//! [`crate::helper`]): it moves the received descriptors to 0-6 and calls `unshare` itself
//! (it is single-threaded, so that is what the agent's `pre_exec` did for it).
//!
//! When there is no spare, or handing over fails (the spare died), the caller starts a helper
//! the old way; a container never waits for a spare.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::error::{invalid, last_os_error, step, GuestError};
use nix::sched::CloneFlags;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// The argument that starts a helper as a spare.
pub const SPARE_ARG: &str = "--spare";
/// The spare's end of its control socket.
const CONTROL_FD: RawFd = 3;
/// The spare's scheduling priority while it waits (the lowest).
const SPARE_NICE: libc::c_int = 19;
/// Descriptors a helper is handed: configuration, status and start pipes, then either stdin,
/// stdout and stderr (pipes) or the terminal socket.
pub const MAX_FDS: usize = 6;

/// A started, idle helper.
#[derive(Debug)]
pub struct Spare {
    pid: i32,
    control: File,
}

static SPARE: Mutex<Option<Spare>> = Mutex::new(None);

/// Starts a spare helper unless one is ready. Errors are left to the on-demand path. The
/// fork and exec happen outside the lock, so a create never waits for them; of two spares
/// started at once, the second is dropped (closing its socket makes it exit).
pub fn refill() {
    if SPARE.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
        return;
    }
    match start() {
        Ok(s) => {
            crate::init::debug(|| format!("spare helper {} started", s.pid));
            let mut slot = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(s);
            }
        }
        Err(e) => crate::init::debug(|| format!("no spare helper: {e}")),
    }
}

/// Refills in the background (a new spare's fork and exec stay off the caller's path).
pub fn refill_later() {
    std::thread::spawn(refill);
}

/// Takes the spare, if there is one.
pub fn take() -> Option<Spare> {
    SPARE.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn start() -> std::io::Result<Spare> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("kata-agent-init")
        .arg("init-container")
        .arg(SPARE_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 and setpriority are async-signal-safe; they run in the forked child before
    // exec. The spare starts at the lowest priority, so its exec and start-up never take the
    // vCPU from the agent's work (a guest often has one); it is restored at hand-over.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(theirs_fd, CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setpriority(libc::PRIO_PROCESS, 0, SPARE_NICE);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    Ok(Spare {
        pid: child.id() as i32,
        control: File::from(ours),
    })
}

impl Spare {
    /// Hands the helper its descriptors and the namespaces to create. Returns its pid.
    pub fn hand_over(self, fds: &[RawFd], unshare: CloneFlags) -> std::io::Result<i32> {
        let flags = (unshare.bits() as u64).to_le_bytes();
        let iov = [IoSlice::new(&flags)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(
            self.control.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(self.pid)
    }
}

/// In the spare helper: waits for the agent's hand-over, puts the descriptors where a helper
/// started on demand has them (0-2 stdio when given, 3 configuration, 4 status, 5 start, 6
/// terminal socket) and creates the namespaces. Exits when the agent goes away first.
pub fn receive() -> Result<(), GuestError> {
    let mut flags = [0u8; 8];
    let mut iov = [std::io::IoSliceMut::new(&mut flags)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        CONTROL_FD,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(step("wait for the agent"))?;
    if msg.bytes == 0 {
        std::process::exit(0); // the agent closed the socket: not needed
    }
    // Back to the normal priority, which the container's processes inherit.
    // SAFETY: setpriority on this process; as guest root it may raise its priority.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } != 0 {
        return Err(last_os_error("restore the priority"));
    }
    let mut fds: Vec<RawFd> = Vec::new();
    for c in msg.cmsgs().map_err(step("hand-over"))? {
        if let ControlMessageOwned::ScmRights(v) = c {
            fds.extend(v);
        }
    }
    let targets: &[RawFd] = match fds.len() {
        6 => &[3, 4, 5, 0, 1, 2],
        4 => &[3, 4, 5, 6],
        n => {
            return Err(invalid(format!(
                "hand-over carried {n} descriptors, not 4 or 6"
            )))
        }
    };
    // Move them out of the way first, so no dup2 below closes one not yet moved.
    let mut high = Vec::new();
    for fd in &fds {
        // SAFETY: fcntl on descriptors this process just received.
        let h = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100) };
        if h < 0 {
            return Err(last_os_error("dup"));
        }
        // SAFETY: `fd` was received above and is ours to close.
        drop(unsafe { File::from_raw_fd(*fd) });
        high.push(h);
    }
    for (h, t) in high.iter().zip(targets) {
        // SAFETY: dup2 onto the helper's fixed descriptor numbers (the control socket, fd 3,
        // is replaced by the configuration pipe: it is not needed any more).
        if unsafe { libc::dup2(*h, *t) } < 0 {
            return Err(last_os_error("dup2"));
        }
        // SAFETY: closing the temporary copy.
        drop(unsafe { File::from_raw_fd(*h) });
    }
    let unshare = CloneFlags::from_bits_truncate(u64::from_le_bytes(flags) as libc::c_int);
    if !unshare.is_empty() {
        nix::sched::unshare(unshare).map_err(step("unshare"))?;
    }
    Ok(())
}
