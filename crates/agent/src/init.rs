//! PID 1 duties: the early mounts, kernel modules, console logging, and power-off.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{invalid, step, GuestError};
use nix::mount::{mount, MsFlags};

/// File the image builder writes: kernel modules in load order, one path per line, relative to
/// `/lib/modules/<release>/`.
pub const MODULES_LIST: &str = "/etc/kata-agent/modules";

/// True when `/` is the initramfs (`rootfs`), which `pivot_root(2)` cannot leave.
pub fn root_is_initramfs() -> bool {
    // Before /proc is mounted: statfs of / tells ramfs/tmpfs, and an initramfs root has no
    // mount point above it. Mount /proc briefly to read mountinfo.
    let _ = std::fs::create_dir_all("/proc");
    let mounted = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::empty(),
        None::<&str>,
    )
    .is_ok();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounted {
        let _ = nix::mount::umount("/proc");
    }
    info.lines().any(|l| {
        let mut parts = l.split(" - ");
        let left = parts.next().unwrap_or("");
        let fstype = parts
            .next()
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("");
        left.split_whitespace().nth(4) == Some("/") && fstype == "rootfs"
    })
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if ft.is_dir() {
            std::fs::create_dir_all(&to)?;
            std::fs::set_permissions(&to, entry.metadata()?.permissions())?;
            copy_tree(&from, &to)?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// Moves the guest's root from the initramfs to a tmpfs (like `switch_root`) and re-executes
/// the agent there, so containers can `pivot_root` out of it. The initramfs files are deleted
/// as they are copied, so memory is not held twice.
pub fn leave_initramfs() -> Result<(), GuestError> {
    let new = Path::new("/.newroot");
    std::fs::create_dir_all(new).map_err(step(format!("mkdir {}", new.display())))?;
    mount(
        Some("rootfs"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(step("mount tmpfs root"))?;
    let entries = std::fs::read_dir("/").map_err(step("read /"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == ".newroot" {
            continue;
        }
        let from = entry.path();
        let to = new.join(&name);
        let ft = entry
            .file_type()
            .map_err(step(format!("stat {}", from.display())))?;
        let r = if ft.is_dir() {
            std::fs::create_dir_all(&to)
                .and_then(|_| copy_tree(&from, &to))
                .and_then(|_| std::fs::remove_dir_all(&from))
        } else if ft.is_symlink() {
            std::fs::read_link(&from)
                .and_then(|l| std::os::unix::fs::symlink(l, &to))
                .and_then(|_| std::fs::remove_file(&from))
        } else if ft.is_file() {
            std::fs::copy(&from, &to)
                .and_then(|_| std::fs::remove_file(&from))
                .map(|_| ())
        } else {
            Ok(())
        };
        r.map_err(step(format!("move {} to the new root", from.display())))?;
    }
    std::env::set_current_dir(new).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move the new root to /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    let init = CString::new("/init").map_err(step("/init"))?;
    let args: Vec<CString> = std::env::args()
        .filter_map(|a| CString::new(a).ok())
        .collect();
    nix::unistd::execv(&init, &args).map_err(step("re-exec /init"))?;
    Ok(())
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and the cgroup2 hierarchy.
pub fn early_mounts() {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 8] = [
        ("proc", "/proc", "proc", nosuid_nodev, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev, None),
    ];
    for (src, dst, fstype, flags, data) in table {
        let _ = std::fs::create_dir_all(dst);
        if let Err(e) = mount(Some(src), dst, Some(fstype), flags, data) {
            log(&format!("mount {fstype} on {dst}: {e}"));
        }
    }
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx.tmp")
        .and_then(|_| std::fs::rename("/dev/ptmx.tmp", "/dev/ptmx"));
    for (name, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, name);
    }
    // Give every cgroup controller to the children of the root.
    if let Ok(ctrl) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: Vec<String> = ctrl.split_whitespace().map(|c| format!("+{c}")).collect();
        let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "));
    }
}

/// Loads the modules the image lists, in order. Returns how many loaded.
pub fn load_modules() -> usize {
    let Ok(list) = std::fs::read_to_string(MODULES_LIST) else {
        return 0;
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_default();
    let base = Path::new("/lib/modules").join(release);
    let mut loaded = 0;
    for rel in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if load_module(&base.join(rel), "") {
            loaded += 1;
        }
    }
    loaded
}

/// Loads one `.ko` with parameters. Already-loaded modules count as loaded.
pub fn load_module(path: &Path, params: &str) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        log(&format!("module {} not found", path.display()));
        return false;
    };
    let Ok(params) = CString::new(params) else {
        return false;
    };
    // SAFETY: finit_module reads the module from the open fd; params is a valid C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return true;
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return true;
    }
    log(&format!("load module {}: {err}", path.display()));
    false
}

/// Loads a module by name (with parameters), finding it under /lib/modules. A module built into
/// the kernel (it has `/sys/module/<name>`, or the kernel has no module support and the name is
/// built in) needs no loading; parameters cannot be given to it then.
pub fn modprobe(spec: &str) -> Result<(), GuestError> {
    let mut parts = spec.split_whitespace();
    let name = parts
        .next()
        .ok_or_else(|| invalid("empty module specification"))?;
    let params: Vec<&str> = parts.collect();
    let sys = Path::new("/sys/module").join(name.replace('-', "_"));
    if sys.exists() && !sys.join("initstate").exists() {
        // Built in (a loaded module would have `initstate`).
        if params.is_empty() {
            return Ok(());
        }
        return Err(invalid(format!(
            "kernel module {name} is built into the guest kernel: its parameters ({}) can only be set on the kernel command line ({name}.<param>=<value> in [hypervisor].kernel_params)",
            params.join(" ")
        )));
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_default();
    let base = Path::new("/lib/modules").join(release);
    let file = format!("{}.ko", name.replace('-', "_"));
    let found = find_file(&base, &file).or_else(|| find_file(&base, &format!("{name}.ko")));
    match found {
        Some(p) if load_module(&p, &params.join(" ")) => Ok(()),
        Some(p) => Err(invalid(format!("failed to load {}", p.display()))),
        None => Err(invalid(format!(
            "kernel module {name} is neither built into the guest kernel nor in the guest image"
        ))),
    }
}

fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns debug logging on when the kernel command line has `agent.log=debug`.
pub fn init_debug() {
    let on = std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "agent.log=debug"))
        .unwrap_or(false);
    DEBUG.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Logs when debug logging is on, with the guest's uptime (seconds since boot, as the kernel's
/// own console lines show it), so the phases of a start can be timed from the console log.
pub fn debug(msg: impl FnOnce() -> String) {
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
            .unwrap_or(0.0);
        log(&format!("[{t:.6}] {}", msg()));
    }
}

/// Writes a line to the kernel console (the agent's log).
pub fn log(msg: &str) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "kata-agent: {msg}");
}

/// Syncs and powers the VM off (PID 1 only).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(0)
}
