//! Host primitives every VM source shares: a sandbox's (or a cached VM's) directories, its
//! share, and the cleanup of what a crashed one left. Calls only leaf modules
//! ([`crate::cgroups`], [`crate::network`], [`crate::ids`]).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::SandboxError;

/// Host directory of VM files (sockets, logs) per sandbox.
pub const VM_STATE_ROOT: &str = "/run/vc/vm";
/// Host directory shared with each sandbox's guest.
pub const SHARED_ROOT: &str = "/run/kata-containers/shared/sandboxes";

/// Written in a sandbox's VM directory when its VM came from the VMCache: the VM's id there
/// (QEMU's `-name` and virtiofsd's socket path still carry it).
pub const ADOPTED_FROM: &str = "adopted-from";

/// An I/O error of `what` on `path`.
pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl Fn(std::io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// A sandbox's host directories.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// VM sockets and logs.
    pub vm_dir: PathBuf,
    /// The sandbox's share: `mounts/` and `shared/` (see [`SandboxPaths::mounts_dir`]).
    pub shared_dir: PathBuf,
}

impl SandboxPaths {
    /// The standard locations for sandbox `id`.
    pub fn for_id(id: &str) -> Self {
        SandboxPaths {
            vm_dir: Path::new(VM_STATE_ROOT).join(id),
            shared_dir: Path::new(SHARED_ROOT).join(id),
        }
    }

    /// Where the runtime bind-mounts what it shares (root filesystems, volumes): writable by
    /// the host only, a shared mount so that every bind propagates to [`Self::export_dir`].
    pub fn mounts_dir(&self) -> PathBuf {
        self.shared_dir.join("mounts")
    }

    /// What the guest sees (virtiofsd's or 9p's export): a read-only view of `mounts/` (a slave
    /// of it), so the guest cannot create or replace anything at the top of its share; the
    /// binds inside keep their own modes (a root filesystem stays writable).
    pub fn export_dir(&self) -> PathBuf {
        self.shared_dir.join("shared")
    }
}

/// Creates a sandbox's (or a cached VM's) two directories, mode 0700: only root may enter its
/// state (sockets, console log, the shared tree).
pub(crate) fn create_private_dirs(paths: &SandboxPaths) -> Result<(), SandboxError> {
    for dir in [&paths.vm_dir, &paths.shared_dir] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("failed to create", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("failed to set the mode of", dir))?;
    }
    Ok(())
}

/// Makes `mounts/` (host-writable, shared) and `shared/` (its read-only slave view, exported).
pub(crate) fn prepare_share(paths: &SandboxPaths) -> Result<(), SandboxError> {
    let (mounts, export) = (paths.mounts_dir(), paths.export_dir());
    for d in [&mounts, &export] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(d)
            .map_err(io_err("failed to create", d))?;
    }
    let m = |src: Option<&Path>, target: &Path, flags: MsFlags| {
        mount(src, target, None::<&str>, flags, None::<&str>).map_err(|errno| SandboxError::Mount {
            source_path: src.map(|p| p.display().to_string()).unwrap_or_default(),
            target: target.display().to_string(),
            errno,
        })
    };
    m(Some(&mounts), &mounts, MsFlags::MS_BIND)?;
    m(None, &mounts, MsFlags::MS_SHARED)?;
    m(Some(&mounts), &export, MsFlags::MS_BIND | MsFlags::MS_REC)?;
    m(
        None,
        &export,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
    )?;
    // A slave receives the binds made in mounts/; shared again so that virtiofsd's own mount
    // namespace (a slave of it) receives them too.
    m(None, &export, MsFlags::MS_SLAVE)?;
    m(None, &export, MsFlags::MS_SHARED)?;
    Ok(())
}

/// Where every shim serves its monitor socket (Kata 3.0's Go runtime layout).
pub const MONITOR_DIR: &str = "/run/vc/sbs";

/// The monitor socket of sandbox `id`'s shim: `/run/vc/sbs/<id>/shim-monitor.sock`.
pub fn monitor_socket(id: &str) -> PathBuf {
    Path::new(MONITOR_DIR).join(id).join("shim-monitor.sock")
}

/// Removes a sandbox's directories, unmounting anything left inside the shared directory.
pub fn cleanup_paths(paths: &SandboxPaths) {
    unmount_under(&paths.shared_dir);
    let _ = std::fs::remove_dir_all(&paths.shared_dir);
    let _ = std::fs::remove_dir_all(&paths.vm_dir);
}

/// Kills what a previous, crashed instance of sandbox `id` left (QEMU by its `-name`, virtiofsd
/// by its socket; for a VM taken from the VMCache, by the cache id in `adopted-from`) and
/// removes its directories, recorded cgroups and own network namespace. Returns true when something was there.
pub fn cleanup_stale(id: &str) -> bool {
    if !crate::ids::is_valid(id) {
        return false;
    }
    let paths = SandboxPaths::for_id(id);
    let existed = paths.vm_dir.exists() || paths.shared_dir.exists();
    // A VM taken from the VMCache carries the cache's id on its command lines.
    let born_as = std::fs::read_to_string(paths.vm_dir.join(ADOPTED_FROM))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| crate::ids::is_valid(s))
        .unwrap_or_else(|| id.to_string());
    // QEMU is found by its `-name` (a pid file is written only once QEMU runs, and may name
    // a recycled pid), virtiofsd by its socket: one pass over /proc.
    let name = format!("sandbox-{born_as}");
    let socket = Path::new(VM_STATE_ROOT)
        .join(&born_as)
        .join("vfsd.sock")
        .display()
        .to_string();
    let mut qemus = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline);
        let args: Vec<&str> = text.split('\0').collect();
        let is_qemu = args.windows(2).any(|w| w[0] == "-name" && w[1] == name);
        if is_qemu || args.contains(&socket.as_str()) {
            // SAFETY: plain kill(2) of this sandbox's QEMU or virtiofsd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if is_qemu {
                qemus.push(pid);
            }
        }
    }
    for pid in qemus {
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() || zombie(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    crate::cgroups::remove_recorded(&paths.vm_dir);
    cleanup_paths(&paths);
    let netns = crate::network::owned_netns_path(id).exists();
    crate::network::delete_owned_netns(id);
    existed || netns
}

/// Whether process `pid` has exited and waits to be reaped (or is gone).
pub(crate) fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

/// Unmounts every mount at or below `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for t in targets {
        let _ = umount2(&t, MntFlags::MNT_DETACH);
    }
}
