//! The mounts the agent makes: a container's (inside its root filesystem, which an image wrote,
//! so resolved with [`kata_mount::safe`]) and the sandbox's storages (the shared filesystem).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use crate::error::{step, GuestError};
use kata_mount::{Kind, MountOptions};

/// Mounts `source` (type `fstype`, OCI `options`) on `dest` resolved inside `root`: symlinks
/// and `..` in the root never lead out of it, missing mount points are made inside it, a bind
/// mount is read-only (`ro`: its top, `rro`: every submount) before it is attached, and an
/// option the mount cannot honour is an error.
pub fn mount_in(
    root: BorrowedFd<'_>,
    source: &str,
    dest: &Path,
    fstype: &str,
    options: &[String],
) -> Result<(), GuestError> {
    let what = |e: kata_mount::MountError| {
        step(format!("mount {} ({fstype} {source})", dest.display()))(e)
    };
    let opts: MountOptions = kata_mount::parse(options, fstype == "bind").map_err(what)?;
    let kind = if opts.bind && !Path::new(source).is_dir() {
        Kind::File
    } else {
        Kind::Dir
    };
    let target = kata_mount::create_in_root(root, dest, kind).map_err(what)?;
    if opts.bind {
        return kata_mount::bind(Path::new(source), target.as_fd(), &opts).map_err(what);
    }
    // The guest has cgroup v2 only; the kernel refuses v1 controller lists there.
    let (fstype, opts) = if fstype == "cgroup" || fstype == "cgroup2" {
        let mut o = opts.clone();
        o.data.clear();
        ("cgroup2", o)
    } else {
        (fstype, opts)
    };
    kata_mount::mount_fs(source, fstype, &target, &opts).map_err(what)?;
    if !opts.all.is_empty() || !opts.propagation.is_empty() {
        // The new mount, found again inside the root: `rro` and the other recursive
        // attributes, and the propagation, which mount(2) cannot set with the filesystem.
        let mounted = kata_mount::open_in_root(root, dest)
            .map_err(|e| what(kata_mount::MountError::io("find the new mount", e)))?;
        kata_mount::finish_fs_mount(mounted.as_fd(), &opts).map_err(what)?;
    }
    Ok(())
}

/// Mounts on an absolute guest path the agent controls (the sandbox's storages).
pub fn mount_one(
    source: &str,
    dest: &Path,
    fstype: &str,
    options: &[String],
) -> Result<(), GuestError> {
    let root = kata_mount::open_dir(Path::new("/")).map_err(step("open /"))?;
    mount_in(root.as_fd(), source, dest, fstype, options)
}
