//! The container's root filesystem, prepared by the helper inside the container's mount namespace:
//! its mounts (resolved inside the root), devices, masked and read-only paths, sysctls, and the
//! pivot into it.

use super::*;

pub(super) fn setup_rootfs(spec: &Spec, rootfs: &Path) -> Result<(), GuestError> {
    // A privileged container (CAP_SYS_ADMIN in its bounding set, as CRI and Docker give it).
    let privileged = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .and_then(|c| c.bounding().as_ref())
        .is_some_and(|b| b.contains(&oci_spec::runtime::Capability::SysAdmin));
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make / private"))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step(format!("bind rootfs {}", rootfs.display())))?;
    // Every mount point is resolved inside the root filesystem (an image's symlinks never lead
    // out of it) and mounted through a descriptor.
    let root = kata_mount::open_dir(rootfs).map_err(step(format!(
        "open the root filesystem {}",
        rootfs.display()
    )))?;
    let mut dev_is_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        let fstype = m.typ().clone().unwrap_or_default();
        let source = m
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_default();
        let options = m.options().clone().unwrap_or_default();
        if dest == Path::new("/dev") && fstype == "tmpfs" {
            dev_is_tmpfs = true;
        }
        if fstype == "sysfs" || fstype == "cgroup" || fstype == "cgroup2" {
            // Without a network namespace of its own, sysfs cannot be mounted again: bind the
            // guest's read-only instead.
            let ro = vec![
                "rbind".to_string(),
                "rro".to_string(),
                "nosuid".to_string(),
                "nodev".to_string(),
                "noexec".to_string(),
            ];
            let src = if fstype == "sysfs" {
                "/sys"
            } else {
                "/sys/fs/cgroup"
            };
            // The guest has the unified hierarchy only: a "cgroup" (v1) mount, which a manager
            // on a cgroup v1 host asks for, is the guest's cgroup2, as runc mounts it on a v2
            // host. A fresh mount's root is the cgroup namespace's (the container's own cgroup
            // with a namespace of its own; the guest's whole tree without).
            let (source, fstype) = if fstype == "sysfs" {
                (source, fstype)
            } else {
                ("cgroup".to_string(), "cgroup2".to_string())
            };
            // Without a cgroup namespace, an unprivileged container sees its own cgroup at
            // /sys/fs/cgroup, as runc's do on a cgroup v1 host and with a namespace on a v2 one
            // (what the kubelet's tools and a JVM sizing its heap read): its cgroup directory,
            // bound read-only. A privileged one sees the guest's whole tree.
            if fstype == "cgroup2" && !super::wants_cgroup_namespace(spec) && !privileged {
                if let Some(own) = own_cgroup_dir() {
                    mount_in(root.as_fd(), &own.display().to_string(), dest, "bind", &ro)?;
                    continue;
                }
            }
            if mount_in(root.as_fd(), &source, dest, &fstype, &options).is_err() {
                mount_in(root.as_fd(), src, dest, "bind", &ro)?;
            }
            continue;
        }
        if source.starts_with(EPHEMERAL_DIR) {
            // A pod's emptyDir in guest memory: made on first use, shared by the pod's containers.
            std::fs::create_dir_all(&source).map_err(step(format!("create emptyDir {source}")))?;
        }
        mount_in(root.as_fd(), &source, dest, &fstype, &options)?;
    }
    if dev_is_tmpfs {
        make_devices(root.as_fd())?;
    }
    if let Some(linux) = spec.linux() {
        for d in linux.devices().iter().flatten() {
            spec_device(root.as_fd(), d, privileged)?;
        }
    }
    drop(root);
    std::env::set_current_dir(rootfs).map_err(step(format!("chdir {}", rootfs.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(step(format!("pivot_root {}", rootfs.display())))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach old root"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    if let Some(linux) = spec.linux() {
        // Before /proc/sys is made read-only (runc's order).
        for (key, value) in linux.sysctl().iter().flatten() {
            write_sysctl(key, value)?;
        }
        for path in linux.masked_paths().iter().flatten() {
            mask(Path::new(path))?;
        }
        for path in linux.readonly_paths().iter().flatten() {
            let p = Path::new(path);
            if !p.exists() {
                continue;
            }
            mount(
                Some(p),
                p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(step(format!("bind {path}")))?;
            mount(
                None::<&str>,
                p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(step(format!("make {path} read-only")))?;
        }
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(step("make the root filesystem read-only"))?;
    }
    Ok(())
}

/// Whether a sysctl belongs to a namespace the container has of its own (runc's rule; in the
/// guest, the pod's network namespace is the guest's, so `net.*` is the pod's to set).
pub fn sysctl_allowed(key: &str) -> bool {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    IPC.contains(&key)
        || key.starts_with("fs.mqueue.")
        || key.starts_with("net.")
        || key == "kernel.hostname"
        || key == "kernel.domainname"
}

/// `/proc/sys/<key with / for .>`, refusing what could name another file.
pub fn sysctl_path(key: &str) -> Result<PathBuf, GuestError> {
    if key.is_empty() || key.contains('/') || key.split('.').any(|c| c.is_empty() || c == "..") {
        return Err(invalid(format!("sysctl {key:?} is not a valid name")));
    }
    if !sysctl_allowed(key) {
        return Err(invalid(format!(
            "sysctl {key} is not in a separate kernel namespace of the container (allowed: \
             kernel.msg*, kernel.sem, kernel.shm*, fs.mqueue.*, net.*, kernel.hostname, \
             kernel.domainname)"
        )));
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

pub(crate) fn write_sysctl(key: &str, value: &str) -> Result<(), GuestError> {
    let path = sysctl_path(key)?;
    std::fs::write(&path, value).map_err(step(format!("sysctl {key}={value}")))
}

pub(super) fn mask(p: &Path) -> Result<(), GuestError> {
    if p.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(step(format!("mask {}", p.display())))
    } else if p.exists() {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(format!("mask {}", p.display())))
    } else {
        Ok(())
    }
}

/// Makes a device of `linux.devices` in the container, as runc does, if the guest has it (the
/// same type and numbers under /sys/dev): a VM has its own devices, not the host's. A device the
/// guest does not have is an error, except in a privileged container, whose spec lists every
/// host device (containerd's `privileged_without_host_devices` avoids that): skipped, said on
/// the console.
pub(super) fn spec_device(
    root: std::os::fd::BorrowedFd<'_>,
    d: &oci_spec::runtime::LinuxDevice,
    privileged: bool,
) -> Result<(), GuestError> {
    use oci_spec::runtime::LinuxDeviceType as T;
    use std::os::fd::AsRawFd;
    let path = d.path();
    let (kind, sys) = match d.typ() {
        T::C | T::U => (libc::S_IFCHR, "char"),
        T::B => (libc::S_IFBLK, "block"),
        T::P => (libc::S_IFIFO, ""),
        T::A => {
            return Err(invalid(format!(
                "device {}: type a is not a device",
                path.display()
            )))
        }
    };
    let (major, minor) = (d.major() as u32, d.minor() as u32);
    if !sys.is_empty() && !Path::new(&format!("/sys/dev/{sys}/{major}:{minor}")).exists() {
        if privileged {
            let _ = std::fs::write(
                "/dev/kmsg",
                format!(
                    "kata-agent: host device {} ({sys} {major}:{minor}) is not in the VM; skipped for this privileged container\n",
                    path.display()
                ),
            );
            return Ok(());
        }
        return Err(invalid(format!(
            "device {} ({sys} {major}:{minor}) does not exist in the VM: a container gets the guest's devices, not the host's (block volumes: direct-volume; PCI devices: VFIO)",
            path.display()
        )));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| invalid(format!("device path {} has no name", path.display())))?;
    let dir = kata_mount::create_in_root(root, parent, kata_mount::Kind::Dir)
        .map_err(step(format!("device {}", path.display())))?;
    let n = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name))
        .map_err(|_| invalid(format!("device path {} has a NUL byte", path.display())))?;
    let mode = d.file_mode().unwrap_or(0o666) & 0o7777;
    // SAFETY: mknodat(2) relative to a descriptor we own.
    let rc = unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            n.as_ptr(),
            kind | mode,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(step(format!("mknod {}", path.display()))(e));
    }
    // SAFETY: fchmodat(2) and fchownat(2) of the node just made, relative to our descriptor.
    unsafe {
        libc::fchmodat(dir.as_raw_fd(), n.as_ptr(), mode, 0);
        libc::fchownat(
            dir.as_raw_fd(),
            n.as_ptr(),
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    Ok(())
}

/// The devices runc makes in a tmpfs /dev (made below a descriptor of the container's /dev).
pub(super) fn make_devices(root: std::os::fd::BorrowedFd<'_>) -> Result<(), GuestError> {
    use std::os::fd::AsRawFd;
    let dev = kata_mount::open_in_root(root, Path::new("/dev"))
        .map_err(step("open the container's /dev"))?;
    let c = |s: &str| CString::new(s).unwrap_or_default();
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let n = c(name);
        // SAFETY: mknodat(2) and fchmodat(2) relative to a descriptor we own.
        let rc = unsafe {
            libc::mknodat(
                dev.as_raw_fd(),
                n.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                continue;
            }
            return Err(step(format!("mknod /dev/{name}"))(e));
        }
        // mknod honours the umask; make the mode exact (the node was just made: no symlink).
        unsafe { libc::fchmodat(dev.as_raw_fd(), n.as_ptr(), 0o666, 0) };
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let (n, t) = (c(name), c(target));
        // SAFETY: symlinkat(2) relative to a descriptor we own; EEXIST is fine.
        unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), n.as_ptr()) };
    }
    Ok(())
}

/// The calling process's cgroup directory under /sys/fs/cgroup (cgroup v2: the `0::` line of
/// /proc/self/cgroup); None when it cannot be told or is the root.
fn own_cgroup_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    own_cgroup_of(&text).map(|rel| Path::new("/sys/fs/cgroup").join(rel))
}

/// The cgroup path (relative, never `..`) of a /proc/self/cgroup text, unless it is the root.
pub(super) fn own_cgroup_of(text: &str) -> Option<PathBuf> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = Path::new(path.trim()).strip_prefix("/").ok()?;
    let clean = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (clean && !rel.as_os_str().is_empty()).then(|| rel.to_path_buf())
}
