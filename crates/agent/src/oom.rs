//! Waiting for OOM kills without a timer. The kernel marks a cgroup's `memory.events` modified
//! whenever one of its counts changes, which inotify reports; GetOOMEvent sleeps on that (and on
//! a new container) instead of reading every container's counters ten times a second, a wake-up
//! an idle guest pays many times over under TCG.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The `memory.events` files of containers' cgroups, watched for changes.
pub struct OomWatch(AsyncFd<Fd>);

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl OomWatch {
    /// An empty watch.
    pub fn new() -> std::io::Result<OomWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the Inotify owns its fd and lives inside the AsyncFd until it is dropped.
        let fd = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| e.into_parts().1)?;
        Ok(OomWatch(fd))
    }

    /// Watches the `memory.events` of cgroup `dir` (again is harmless: the kernel keeps one
    /// watch per file). A cgroup already gone is not an error: its container has no OOM to come.
    pub fn add(&self, dir: &Path) {
        let _ = self
            .0
            .get_ref()
            .0
            .add_watch(&dir.join("memory.events"), AddWatchFlags::IN_MODIFY);
    }

    /// Waits until a watched file changed (or one was removed), and takes the events.
    pub async fn changed(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::Error::EAGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl std::fmt::Debug for OomWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OomWatch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_to_a_watched_file_wakes_the_wait_and_nothing_else_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "oom_kill 0\n").expect("write");
        let watch = OomWatch::new().expect("inotify");
        watch.add(dir.path());
        std::fs::write(dir.path().join("other"), "x").expect("write");
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(200), watch.changed()).await;
        assert!(quiet.is_err(), "woken by a file it does not watch");
        std::fs::write(&events, "oom_kill 1\n").expect("write");
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed())
            .await
            .expect("not woken by the change")
            .expect("inotify");
    }
}
