//! VM templating (`[factory] enable_template`): one VM is booted until its agent answers,
//! paused, and saved as a template: its RAM is the file `<template_path>/memory` on a tmpfs, its
//! device state `<template_path>/state`. A sandbox then gets its VM by cloning the template: a
//! new QEMU maps `memory` privately (pages are read from the template's page cache and copied
//! only when the clone writes them), loads `state` and runs. What is per sandbox (the shared
//! directory, the agent socket, the NICs, vCPUs and memory above the template's) is given to
//! the clone after it runs or on its own command line.
//!
//! Layout of `<template_path>` (a tmpfs the size of the guest memory + 8 MiB, mode 0700):
//! `memory`, `state`, `identity` (what the template was made from; written last, so a template
//! without it is incomplete), `share/` (the template's empty 9p export), and the template VM's
//! console and QEMU logs. A lock file beside it (`.<name>.lock`) serializes creation
//! (exclusive) against clones starting (shared).

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_config::Config;
use kata_hypervisor::probe::Accel;
use kata_hypervisor::qemu::argv::{AgentChannel, MemoryFile, SharedFsDevice};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::Instrument;

use crate::error::SandboxError;

/// The template's RAM.
pub const MEMORY_FILE: &str = "memory";
/// The template's device state.
pub const STATE_FILE: &str = "state";
/// What the template was made from.
pub const IDENTITY_FILE: &str = "identity";
/// Room on the tmpfs beyond the guest memory (Kata's 8 MiB on amd64).
const TMPFS_EXTRA_MIB: u32 = 8;

/// A VM template directory.
#[derive(Debug, Clone)]
pub struct Template {
    /// `[factory] template_path`.
    pub dir: PathBuf,
}

/// What `factory init` made.
#[derive(Debug, Clone, Copy)]
pub struct Created {
    /// Creation time (boot, save, stop).
    pub ms: u64,
    /// Size limit of the tmpfs (MiB).
    pub tmpfs_mib: u32,
}

/// A shared hold on the template while a clone's QEMU opens `memory` and loads `state`: the
/// template cannot be rebuilt or destroyed meanwhile.
#[derive(Debug)]
pub struct Lease {
    _lock: std::fs::File,
    /// The template's RAM.
    pub memory: PathBuf,
    /// The template's device state.
    pub state: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// `path size mtime inode` of a file the template depends on ("absent" when it is missing).
fn stamp(path: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{path} {} {}.{} {}",
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        ),
        Err(_) if path.is_empty() => "none".into(),
        Err(_) => format!("{path} absent"),
    }
}

/// What a template made for `config` under `accel` depends on: the runtime, the accelerator,
/// the QEMU binary, kernel and initrd (by size, time and inode: a reinstall changes them), and
/// every hypervisor and guest setting. A template is used only if this matches exactly.
pub fn identity(config: &Config, accel: Accel) -> String {
    let h = &config.hypervisor;
    let shape = crate::launch::guest_shape(config);
    format!(
        "runtime {}\naccel {}\nqemu {}\nkernel {}\ninitrd {}\nguest {:?} debug_console={}\nhypervisor {:?}\n",
        env!("CARGO_PKG_VERSION"),
        accel.name(),
        stamp(&h.effective_path(config.hypervisor_kind)),
        stamp(&h.kernel),
        stamp(&h.initrd),
        shape.extra_kernel_params,
        shape.debug_console,
        h,
    )
}

/// Whether a tmpfs is mounted exactly at `dir`.
fn tmpfs_at(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let fstype = f.iter().position(|w| *w == "-").and_then(|i| f.get(i + 1));
        f.get(4).map(|p| p.replace("\\040", " ")) == Some(dir.display().to_string())
            && fstype == Some(&"tmpfs")
    })
}

impl Template {
    /// The template of `config` (`[factory] template_path`).
    pub fn of(config: &Config) -> Template {
        Template {
            dir: PathBuf::from(&config.factory.template_path),
        }
    }

    fn lock_path(&self) -> PathBuf {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "template".into());
        self.dir
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!(".{name}.lock"))
    }

    /// The recorded identity, when the template is complete.
    pub fn recorded_identity(&self) -> Option<String> {
        if !self.dir.join(MEMORY_FILE).exists() || !self.dir.join(STATE_FILE).exists() {
            return None;
        }
        std::fs::read_to_string(self.dir.join(IDENTITY_FILE)).ok()
    }

    /// Whether a complete template is there (`factory status`: "vm factory is on").
    pub fn exists(&self) -> bool {
        self.recorded_identity().is_some()
    }

    async fn lock(&self, exclusive: bool) -> Result<std::fs::File, SandboxError> {
        let path = self.lock_path();
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io("failed to create", parent))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("failed to open the template lock", &path))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        tokio::task::spawn_blocking(move || {
            // SAFETY: flock(2) on a descriptor the closure owns.
            if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f)
        })
        .await
        .map_err(|e| SandboxError::Invalid(format!("template lock task failed: {e}")))?
        .map_err(io("failed to lock", &path))
    }

    /// Makes sure a template made for `config` (under `accel`) is there: creates it when there
    /// is none, rebuilds it when it was made from something else (another kernel, initrd, QEMU,
    /// runtime or setting). Two callers never build two templates. Returns what was created,
    /// if anything was.
    pub async fn ensure(
        &self,
        config: &Config,
        accel: Accel,
    ) -> Result<Option<Created>, SandboxError> {
        let want = identity(config, accel);
        if self.recorded_identity().as_deref() == Some(want.as_str()) {
            return Ok(None);
        }
        let _lock = self.lock(true).await?;
        match self.recorded_identity() {
            Some(have) if have == want => return Ok(None),
            Some(_) => tracing::warn!(
                path = %self.dir.display(),
                "the VM template was made from another kernel, initrd, QEMU, runtime or configuration: rebuilding it"
            ),
            None => {}
        }
        self.destroy_locked();
        let t = Instant::now();
        let tmpfs_mib = self
            .create_locked(config, accel, &want)
            .await
            .inspect_err(|_| {
                self.destroy_locked();
            })?;
        Ok(Some(Created {
            ms: t.elapsed().as_millis() as u64,
            tmpfs_mib,
        }))
    }

    /// A shared hold on a template made for `config`; None when there is none or it was made
    /// from something else.
    pub async fn lease(
        &self,
        config: &Config,
        accel: Accel,
    ) -> Result<Option<Lease>, SandboxError> {
        let lock = self.lock(false).await?;
        if self.recorded_identity() != Some(identity(config, accel)) {
            return Ok(None);
        }
        Ok(Some(Lease {
            _lock: lock,
            memory: self.dir.join(MEMORY_FILE),
            state: self.dir.join(STATE_FILE),
        }))
    }

    /// Marks the template as unusable (a clone of it failed): the next sandbox rebuilds it.
    pub async fn invalidate(&self) {
        if let Ok(_lock) = self.lock(true).await {
            let _ = std::fs::remove_file(self.dir.join(IDENTITY_FILE));
        }
    }

    /// Removes the template (`factory destroy`). Clones keep running: the tmpfs is detached,
    /// and its memory is freed when the last clone mapping the file exits. Returns whether
    /// there was a template.
    pub async fn destroy(&self) -> Result<bool, SandboxError> {
        let _lock = self.lock(true).await?;
        let existed = self.dir.exists();
        self.destroy_locked();
        Ok(existed)
    }

    fn destroy_locked(&self) {
        // A template VM that did not finish (a crashed `factory init`).
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&self.dir.display().to_string()) {
                    kata_hypervisor::qemu::vm::kill_pid(pid);
                }
            }
        }
        while tmpfs_at(&self.dir) {
            if umount2(&self.dir, MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    async fn create_locked(
        &self,
        config: &Config,
        accel: Accel,
        identity: &str,
    ) -> Result<u32, SandboxError> {
        let h = &config.hypervisor;
        let dir = &self.dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("failed to create", dir))?;
        let tmpfs_mib = h.default_memory.saturating_add(TMPFS_EXTRA_MIB);
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(format!("size={tmpfs_mib}M,mode=0700").as_str()),
        )
        .map_err(|errno| SandboxError::Mount {
            source_path: "tmpfs".into(),
            target: dir.display().to_string(),
            errno,
        })?;
        let share = dir.join("share");
        std::fs::DirBuilder::new()
            .mode(0o500)
            .create(&share)
            .map_err(io("failed to create", &share))?;
        let mut spec = crate::launch::launch_spec(
            "template",
            config,
            accel,
            dir,
            AgentChannel::Serial {
                socket: dir.join("agent.sock"),
            },
            SharedFsDevice::Virtio9p { dir: share },
        );
        spec.memory_file = Some(MemoryFile {
            path: dir.join(MEMORY_FILE),
            shared: true,
        });
        let vm = crate::launch::start_qemu(config, &spec, dir)
            .instrument(tracing::info_span!("template_qemu_start"))
            .await?;
        let saved = async {
            let channel = AgentChannel::Serial {
                socket: dir.join("agent.sock"),
            };
            let agent =
                crate::launch::wait_for_agent(&vm, &channel, config.agent.dial_timeout).await?;
            // The agent goes back to waiting for a host: every clone connects afresh.
            drop(agent);
            tokio::time::sleep(Duration::from_millis(100)).await;
            vm.save_state(&dir.join(STATE_FILE), &dir.join("migrate.sock"))
                .await?;
            Ok::<_, SandboxError>(())
        }
        .instrument(tracing::info_span!("template_save"))
        .await;
        vm.stop(Duration::from_millis(500)).await;
        saved?;
        for f in ["agent.sock", "qmp.sock", "pid"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let id_file = dir.join(IDENTITY_FILE);
        std::fs::write(&id_file, identity).map_err(io("failed to write", &id_file))?;
        tracing::info!(path = %dir.display(), tmpfs_mib, "VM template created");
        Ok(tmpfs_mib)
    }
}
