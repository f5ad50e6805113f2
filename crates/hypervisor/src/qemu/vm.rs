//! A running QEMU: spawn it, connect QMP, hot-plug CPUs and memory, stop it, and tell why it
//! died (with the tail of the guest console).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kata_config::hypervisor::HypervisorConfig;
use serde_json::json;
use tokio::sync::watch;

use super::argv::{self, LaunchSpec};
use super::block::{self, BlockDevice, GuestBlockAddr};
use super::qmp::{self, Qmp, QmpError};

/// Errors of the QEMU driver. Each names the file or key involved.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A configured file is missing.
    #[error("{what} {path} does not exist ([hypervisor.qemu].{key})")]
    Missing {
        /// What it is.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Config key.
        key: &'static str,
    },
    /// The network namespace QEMU should start in cannot be opened.
    #[error("cannot open the pod's network namespace {path} to start QEMU in it (was the pod removed meanwhile?)")]
    Netns {
        /// Namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("failed to start {path}")]
    Spawn {
        /// QEMU path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited.
    #[error("QEMU exited ({status}): {stderr}; guest console: {console}")]
    Exited {
        /// Exit status.
        status: String,
        /// QEMU's stderr.
        stderr: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The QMP socket never appeared.
    #[error("QEMU did not open its QMP socket {0} within 10 s")]
    NoQmp(PathBuf),
    /// QMP failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// Saving or loading a template's device state failed.
    #[error("VM templating: {0}")]
    Migration(String),
    /// Hot-plug is impossible.
    #[error("cannot hot-plug: {0}")]
    Hotplug(String),
    /// The configured block driver cannot be hot-plugged.
    #[error("cannot hot-plug: {0}")]
    Driver(#[from] super::block::UnpluggableDriver),
    /// No slot is free for one more device.
    #[error("cannot hot-plug: {0}")]
    NoSlot(#[from] super::block::NoFreeSlot),
    /// A QEMU started by another process (the VMCache server) cannot be taken over.
    #[error("cannot take over QEMU (pid {pid}): {reason}")]
    Adopt {
        /// QEMU's pid.
        pid: u32,
        /// Why.
        reason: String,
    },
}

/// A QEMU process.
#[derive(Debug)]
pub struct Vm {
    /// QEMU's pid.
    pub pid: u32,
    qmp: tokio::sync::Mutex<Qmp>,
    console_log: PathBuf,
    stderr_log: PathBuf,
    exit: watch::Receiver<Option<String>>,
    hypervisor: HypervisorConfig,
    next_dimm: std::sync::atomic::AtomicU32,
    next_scsi_target: std::sync::atomic::AtomicU32,
    /// Set when QEMU is not this process's child (taken over from the VMCache server): it is
    /// watched and killed through this descriptor.
    pidfd: Option<std::sync::Arc<crate::pidfd::PidFd>>,
}

/// The last `lines` lines of the guest console.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let clean: Vec<&str> = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_control()))
        .filter(|l| !l.is_empty())
        .collect();
    let start = clean.len().saturating_sub(lines);
    // A panic's first line says why; its stack trace would push it out of the tail.
    let panic = clean[..start].iter().find(|l| l.contains("Kernel panic"));
    let tail = clean[start..].join(" | ");
    match panic {
        Some(p) => format!("{p} | ... | {tail}"),
        None => tail,
    }
}

/// The guest's memory block size on x86-64 (`/sys/devices/system/memory/block_size_bytes`).
pub const MEMORY_BLOCK: u64 = 128 * 1024 * 1024;

impl Vm {
    /// Starts QEMU and connects to its QMP socket.
    pub async fn start(
        qemu: &Path,
        h: &HypervisorConfig,
        spec: &LaunchSpec,
        stderr_log: &Path,
    ) -> Result<Vm, VmError> {
        if !qemu.exists() {
            return Err(VmError::Missing {
                what: "hypervisor binary",
                path: qemu.to_path_buf(),
                key: "path",
            });
        }
        if !Path::new(&h.kernel).exists() {
            return Err(VmError::Missing {
                what: "guest kernel",
                path: PathBuf::from(&h.kernel),
                key: "kernel",
            });
        }
        if !h.initrd.is_empty() && !Path::new(&h.initrd).exists() {
            return Err(VmError::Missing {
                what: "guest initrd",
                path: PathBuf::from(&h.initrd),
                key: "initrd",
            });
        }
        let mut spec = spec.clone();
        if !h.image.is_empty() {
            let meta = std::fs::metadata(&h.image).map_err(|_| VmError::Missing {
                what: "guest rootfs image",
                path: PathBuf::from(&h.image),
                key: "image",
            })?;
            spec.image_size = meta.len();
        }
        let spec = &spec;
        let args = argv::build(h, spec);
        tracing::debug!(?args, "starting QEMU");
        let stderr = std::fs::File::create(stderr_log).map_err(|source| VmError::Spawn {
            path: stderr_log.to_path_buf(),
            source,
        })?;
        let mut cmd = tokio::process::Command::new(qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        // QEMU starts inside the pod's network namespace, where its taps are.
        let netns = match &spec.netns {
            Some(p) => Some(std::fs::File::open(p).map_err(|source| VmError::Netns {
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        if let Some(f) = &netns {
            use std::os::fd::AsRawFd;
            let fd = f.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; fd stays open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // Tap descriptors (macvtaps) are inherited under their own numbers.
        let inherited: Vec<i32> = spec.nics.iter().filter_map(|n| n.fd).collect();
        if !inherited.is_empty() {
            // SAFETY: fcntl(2) is async-signal-safe; the descriptors stay open in the caller
            // until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &inherited {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
            path: qemu.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            tx.send_replace(Some(status));
        });
        let mut vm_exit = exit.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            if let Some(status) = vm_exit.borrow_and_update().clone() {
                return Err(exited(status, stderr_log, &spec.console_log));
            }
            if spec.qmp_socket.exists() {
                match Qmp::connect(&spec.qmp_socket).await {
                    Ok(q) => break q,
                    Err(QmpError::Io { .. }) => {}
                    Err(e) => {
                        // QEMU closing QMP at once is QEMU exiting: say why.
                        let exit = tokio::time::timeout(Duration::from_secs(1), async {
                            while vm_exit.borrow_and_update().is_none() {
                                if vm_exit.changed().await.is_err() {
                                    break;
                                }
                            }
                        })
                        .await;
                        if exit.is_ok() {
                            if let Some(status) = vm_exit.borrow().clone() {
                                return Err(exited(status, stderr_log, &spec.console_log));
                            }
                        }
                        kill_pid(pid);
                        return Err(e.into());
                    }
                }
            }
            if Instant::now() > deadline {
                kill_pid(pid);
                return Err(VmError::NoQmp(spec.qmp_socket.clone()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        Ok(Vm {
            pid,
            qmp: tokio::sync::Mutex::new(qmp),
            console_log: spec.console_log.clone(),
            stderr_log: stderr_log.to_path_buf(),
            exit,
            hypervisor: h.clone(),
            next_dimm: std::sync::atomic::AtomicU32::new(0),
            next_scsi_target: std::sync::atomic::AtomicU32::new(0),
            pidfd: None,
        })
    }

    /// Takes over a running QEMU that another process started (the VMCache server): watches
    /// it through a process descriptor (its exit status is not ours to read) and connects to
    /// its QMP socket, which its previous owner has closed. `name` is the VM's id on QEMU's
    /// command line (`-name sandbox-<name>`). `console_log` and `stderr_log`
    /// are where its output goes now.
    pub async fn adopt(
        pid: u32,
        h: &HypervisorConfig,
        name: &str,
        qmp_socket: &Path,
        console_log: &Path,
        stderr_log: &Path,
    ) -> Result<Vm, VmError> {
        let fail = |reason: String| VmError::Adopt { pid, reason };
        let pidfd =
            crate::pidfd::PidFd::open(pid).map_err(|e| fail(format!("no such process: {e}")))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let wanted = format!("sandbox-{name}");
        if !String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == wanted)
        {
            return Err(fail(format!("it is not the QEMU of VM {name}")));
        }
        let pidfd = std::sync::Arc::new(pidfd);
        let (tx, exit) = watch::channel(None);
        let watched = pidfd.clone();
        tokio::spawn(async move {
            let status = match watched.wait().await {
                Ok(()) => "exited; its status went to the process that started it".to_string(),
                Err(e) => format!("cannot watch it: {e}"),
            };
            tx.send_replace(Some(status));
        });
        // The previous owner may still be closing its QMP session: QEMU greets the next
        // client only then.
        let qmp = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match Qmp::connect(qmp_socket).await {
                    Ok(q) => return Ok(q),
                    Err(QmpError::Io { .. }) | Err(QmpError::Closed) if !pidfd.exited() => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let qmp = match qmp {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                let _ = pidfd.signal(libc::SIGKILL);
                return Err(fail(format!("QMP {}: {e}", qmp_socket.display())));
            }
            Err(_) => {
                let _ = pidfd.signal(libc::SIGKILL);
                return Err(fail(format!(
                    "QMP {} did not greet within 5 s",
                    qmp_socket.display()
                )));
            }
        };
        Ok(Vm {
            pid,
            qmp: tokio::sync::Mutex::new(qmp),
            console_log: console_log.to_path_buf(),
            stderr_log: stderr_log.to_path_buf(),
            exit,
            hypervisor: h.clone(),
            next_dimm: std::sync::atomic::AtomicU32::new(0),
            next_scsi_target: std::sync::atomic::AtomicU32::new(0),
            pidfd: Some(pidfd),
        })
    }

    /// SIGKILLs QEMU (through its process descriptor when it is not our child).
    pub fn kill(&self) {
        match &self.pidfd {
            Some(p) => {
                let _ = p.signal(libc::SIGKILL);
            }
            None => kill_pid(self.pid),
        }
    }

    /// Why QEMU exited, if it did.
    pub fn exit_error(&self) -> Option<VmError> {
        self.exit
            .borrow()
            .clone()
            .map(|status| exited(status, &self.stderr_log, &self.console_log))
    }

    /// Waits until QEMU exits.
    pub async fn wait_exit(&self) -> VmError {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = rx.borrow_and_update().clone() {
                return exited(status, &self.stderr_log, &self.console_log);
            }
            if rx.changed().await.is_err() {
                return exited("unknown".into(), &self.stderr_log, &self.console_log);
            }
        }
    }

    /// The last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail(&self.console_log, lines)
    }

    /// Runs a QMP command.
    pub async fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmError> {
        Ok(self.qmp.lock().await.execute(command, args).await?)
    }

    /// Asks QEMU to quit, then kills it if it is still there after `grace`.
    pub async fn stop(&self, grace: Duration) {
        if self.exit.borrow().is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp("quit", None)).await;
        }
        let mut rx = self.exit.clone();
        let waited = tokio::time::timeout(grace, async {
            while rx.borrow_and_update().is_none() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_err() {
            self.kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
        }
    }
}

fn exited(status: String, stderr_log: &Path, console: &Path) -> VmError {
    let stderr = std::fs::read_to_string(stderr_log).unwrap_or_default();
    let stderr = stderr
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ");
    VmError::Exited {
        status,
        stderr,
        console: console_tail(console, 12),
    }
}

/// How long saving or loading a template's device state may take (it is a few hundred KiB).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

const SAVING: &str = "saving the device state to";
const LOADING: &str = "loading the device state from";

/// Streams a template's device state (`copy`: through the unix socket `via`) within
/// [`MIGRATION_TIMEOUT`], then removes the socket.
async fn stream_state(
    what: &str,
    state: &Path,
    via: &Path,
    copy: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), VmError> {
    let copied = tokio::time::timeout(MIGRATION_TIMEOUT, copy).await;
    let _ = std::fs::remove_file(via);
    match copied {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(VmError::Migration(format!(
            "{what} {}: {e}",
            state.display()
        ))),
        Err(_) => Err(too_slow(what, state)),
    }
}

/// SIGKILL a process by pid (ignores errors: it may be gone).
pub fn kill_pid(pid: u32) {
    // (A QEMU we did not start is killed with [`Vm::kill`], through its process descriptor.)
    if pid > 0 {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

mod devices;
mod hotplug;
mod migrate;

#[cfg(test)]
use hotplug::next_dimm_addr;
pub use hotplug::{parse_cpu_threads, PluggedDimm};
use migrate::too_slow;

#[cfg(test)]
mod tests;
