//! virtiofsd, one per sandbox: started before QEMU (QEMU connects to its socket), exits when
//! its VM disconnects; stopped explicitly on every error path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kata_config::hypervisor::HypervisorConfig;

/// Errors starting virtiofsd.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// The binary is missing.
    #[error("virtio-fs daemon {0} does not exist ([hypervisor.qemu].virtio_fs_daemon)")]
    Missing(PathBuf),
    /// It could not start.
    #[error("failed to start {path}")]
    Spawn {
        /// Binary.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It exited or never created its socket.
    #[error("virtiofsd did not create its socket {socket}: {log}")]
    NoSocket {
        /// Socket.
        socket: PathBuf,
        /// Its log.
        log: String,
    },
}

/// A running virtiofsd.
#[derive(Debug)]
pub struct Virtiofsd {
    owner: Owner,
    /// Its pid.
    pub pid: u32,
    /// Its process group (its own, led by `pid`): the namespace sandbox forks, and a child can
    /// outlive the parent; [`Virtiofsd::stop`] ends the whole group.
    group: Option<u32>,
}

/// How a virtiofsd is held: started here, or taken over from the VMCache server.
#[derive(Debug)]
enum Owner {
    Child(tokio::process::Child),
    Adopted(crate::pidfd::PidFd),
}

/// Kills every process of group `pgid` still running and waits (at most `limit`) until none
/// is (a zombie waiting for its reaper counts as gone).
pub fn kill_group_and_wait(pgid: u32, limit: Duration) {
    if pgid == 0 {
        return;
    }
    let running = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    return false;
                };
                // After the command's closing parenthesis: state, ppid, pgrp.
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().take(3).collect())
                    .unwrap_or_default();
                fields.len() == 3
                    && fields[2] == pgid.to_string()
                    && fields[0] != "Z"
                    && fields[0] != "X"
            })
    };
    if !running() {
        return;
    }
    // SAFETY: kill(2) on a process group this process started (led by its virtiofsd).
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
    let deadline = Instant::now() + limit;
    while running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// virtiofsd's arguments (pure).
pub fn args(h: &HypervisorConfig, socket: &Path, shared_dir: &Path) -> Vec<String> {
    let mut a = vec![
        "--socket-path".to_string(),
        socket.display().to_string(),
        "--shared-dir".to_string(),
        shared_dir.display().to_string(),
        "--cache".to_string(),
        h.virtio_fs_cache.virtiofsd_name().to_string(),
    ];
    // Confined: its own mount, pid and network namespaces with the export as its root (binds
    // made later propagate into it), and its seccomp filter killing any system call it does not
    // need (GHSA-2gv2-cffp-j227). An admin's `--sandbox`/`--seccomp` in virtio_fs_extra_args
    // replaces the default (virtiofsd refuses a flag given twice).
    let extra = &h.virtio_fs_extra_args;
    let given = |flag: &str| {
        extra
            .iter()
            .any(|x| x == flag || x.starts_with(&format!("{flag}=")))
    };
    for (flag, value) in [("--sandbox", "namespace"), ("--seccomp", "kill")] {
        if !given(flag) {
            a.push(flag.to_string());
            a.push(value.to_string());
        }
    }
    a.extend(extra.iter().cloned());
    a
}

impl Virtiofsd {
    /// Starts virtiofsd and waits for its socket.
    pub async fn start(
        h: &HypervisorConfig,
        socket: &Path,
        shared_dir: &Path,
        log: &Path,
    ) -> Result<Self, VirtiofsdError> {
        let bin = PathBuf::from(&h.virtio_fs_daemon);
        if !bin.exists() {
            return Err(VirtiofsdError::Missing(bin));
        }
        let log_file = std::fs::File::create(log).map_err(|source| VirtiofsdError::Spawn {
            path: log.to_path_buf(),
            source,
        })?;
        let mut child = tokio::process::Command::new(&bin)
            .args(args(h, socket, shared_dir))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .process_group(0)
            .spawn()
            .map_err(|source| VirtiofsdError::Spawn {
                path: bin.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            let dead = matches!(child.try_wait(), Ok(Some(_)));
            if dead || Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VirtiofsdError::NoSocket {
                    socket: socket.to_path_buf(),
                    log: std::fs::read_to_string(log)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Virtiofsd {
            owner: Owner::Child(child),
            pid,
            group: (pid > 0).then_some(pid),
        })
    }

    /// Takes over virtiofsd `pid`, which another process (the VMCache server) started and
    /// which serves `socket`.
    pub fn adopt(pid: u32, socket: &Path) -> std::io::Result<Self> {
        let p = crate::pidfd::PidFd::open(pid)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let socket = socket.display().to_string();
        if !String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == socket)
        {
            return Err(std::io::Error::other(format!(
                "process {pid} is not the virtiofsd serving {socket}"
            )));
        }
        // SAFETY: getpgid(2) on a pid.
        let pgid = unsafe { libc::getpgid(pid as i32) };
        Ok(Virtiofsd {
            owner: Owner::Adopted(p),
            pid,
            group: (pgid == pid as i32).then_some(pid),
        })
    }

    /// Lets go of it (it goes on serving its VM, whose new owner adopts it); it is still
    /// reaped here when it exits.
    pub fn release(self) {
        if let Owner::Child(mut child) = self.owner {
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        }
    }

    /// The pid of the process serving the guest (`None` once it has been reaped): with its
    /// namespace sandbox virtiofsd forks, and the child (in the new pid namespace) does the
    /// work while the parent waits for it.
    pub fn pid(&self) -> Option<u32> {
        let pid = match &self.owner {
            Owner::Child(c) => c.id()?,
            Owner::Adopted(p) if p.exited() => return None,
            Owner::Adopted(p) => p.pid,
        };
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        Some(
            children
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(pid),
        )
    }

    /// Stops it (it normally exits by itself when QEMU goes away).
    pub async fn stop(self) {
        let group = self.group;
        self.stop_started().await;
        if let Some(pgid) = group {
            let _ = tokio::task::spawn_blocking(move || {
                kill_group_and_wait(pgid, Duration::from_secs(2))
            })
            .await;
        }
    }

    /// Its process group, if it leads one.
    pub fn group(&self) -> Option<u32> {
        self.group
    }

    async fn stop_started(self) {
        match self.owner {
            Owner::Child(mut child) => {
                if tokio::time::timeout(Duration::from_millis(500), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
            Owner::Adopted(p) => {
                if tokio::time::timeout(Duration::from_millis(500), p.wait())
                    .await
                    .is_err()
                {
                    let _ = p.signal(libc::SIGKILL);
                    let _ = tokio::time::timeout(Duration::from_secs(2), p.wait()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_cache_mode_and_extra_args() {
        let h = HypervisorConfig::default();
        let a = args(&h, Path::new("/s.sock"), Path::new("/shared"));
        assert_eq!(
            a[..6],
            [
                "--socket-path",
                "/s.sock",
                "--shared-dir",
                "/shared",
                "--cache",
                "auto"
            ]
        );
        assert!(a.ends_with(&[
            "--thread-pool-size=1".to_string(),
            "-o".to_string(),
            "announce_submounts".to_string()
        ]));
        assert!(a.windows(2).any(|w| w == ["--sandbox", "namespace"]));
        assert!(a.windows(2).any(|w| w == ["--seccomp", "kill"]));
    }

    #[test]
    fn an_admins_sandbox_flags_replace_the_defaults() {
        let h = HypervisorConfig {
            virtio_fs_extra_args: vec!["--sandbox=chroot".into(), "--seccomp".into(), "log".into()],
            ..HypervisorConfig::default()
        };
        let a = args(&h, Path::new("/s.sock"), Path::new("/shared"));
        assert_eq!(a.iter().filter(|x| x.starts_with("--sandbox")).count(), 1);
        assert_eq!(a.iter().filter(|x| x.starts_with("--seccomp")).count(), 1);
        assert!(a.ends_with(&["--sandbox=chroot".into(), "--seccomp".into(), "log".into()]));
    }
}
