//! Process descriptors (pidfd_open(2)) for processes this one did not start: a VM handed over
//! by the VMCache server (QEMU, virtiofsd) is watched and signalled through them, so a recycled
//! pid is never signalled by mistake.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A descriptor of a live process.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    /// The process id it refers to.
    pub pid: u32,
}

impl PidFd {
    /// Opens a descriptor of process `pid`. Fails when there is no such process.
    pub fn open(pid: u32) -> std::io::Result<PidFd> {
        let raw = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        if raw <= 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open(2) takes a pid and flags; it returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(PidFd { fd, pid })
    }

    /// Sends `signal` to the process (never to a later process with the same pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on a descriptor we own, without siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the process has exited (a process descriptor becomes readable then).
    pub fn exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own, without waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents != 0
    }

    /// Waits until the process exits.
    pub async fn wait(&self) -> std::io::Result<()> {
        let fd = self.fd.try_clone()?;
        // SAFETY: `afd` owns `fd` (a duplicate made above), so the descriptor stays open and
        // is not reused for as long as it is registered.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)?
        };
        let _ready = afd.readable().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sees_a_process_that_is_not_its_child_exit() {
        // A grandchild: `sh` starts `sleep` in the background and exits.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .expect("sh");
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid");
        let p = PidFd::open(pid).expect("pidfd_open");
        assert!(!p.exited());
        p.signal(libc::SIGKILL).expect("signal");
        tokio::time::timeout(std::time::Duration::from_secs(5), p.wait())
            .await
            .expect("exit seen within 5 s")
            .expect("wait");
        assert!(p.exited());
        assert!(PidFd::open(0).is_err());
    }
}
