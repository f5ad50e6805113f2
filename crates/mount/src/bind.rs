//! Mounting on a resolved mount point (a descriptor from [`crate::safe`]).
//!
//! A bind mount is made whole before anyone can see it: `open_tree(OPEN_TREE_CLONE)` copies the
//! source (with its submounts for `rbind`), `mount_setattr` makes it read-only (the top for `ro`,
//! every submount for `rro`) and sets its other attributes, and only then does `move_mount`
//! attach it. There is no window in which a read-only volume is writable, and `rro` reaches the
//! submounts that a `MS_REMOUNT` never did. A new filesystem (tmpfs, proc...) is mounted with
//! `mount(2)` on `/proc/self/fd/N`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::MsFlags;

use crate::error::MountError;
use crate::options::{Attr, MountOptions};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn setattr(fd: BorrowedFd<'_>, recursive: bool, attr: Attr, propagation: u64) -> io::Result<()> {
    let a = MountAttr {
        attr_set: attr.set,
        attr_clr: attr.clr,
        propagation,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: mount_setattr(2) reads `a` (of the size given) and an empty path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &a as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bind-mounts `source` on the mount point `target` with `o`'s attributes (see the module doc).
pub fn bind(source: &Path, target: BorrowedFd<'_>, o: &MountOptions) -> Result<(), MountError> {
    let step = |what: &str| format!("bind {}: {what}", source.display());
    let src = cstr(source).map_err(|e| MountError::io(step("its path"), e))?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if o.recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree(2) with a valid C string; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags) };
    if fd < 0 {
        return Err(MountError::io(
            step("open_tree"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: a descriptor just returned by open_tree(2).
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    use std::os::fd::AsFd;
    if !o.top.is_empty() {
        setattr(tree.as_fd(), false, o.top, 0)
            .map_err(|e| MountError::io(step("set its attributes"), e))?;
    }
    if !o.all.is_empty() {
        setattr(tree.as_fd(), true, o.all, 0)
            .map_err(|e| MountError::io(step("set the attributes of it and its submounts"), e))?;
    }
    // SAFETY: move_mount(2) between two descriptors we own, with empty paths.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(MountError::io(
            step("attach it"),
            io::Error::last_os_error(),
        ));
    }
    if !o.propagation.is_empty() {
        // Now attached: the tree's descriptor is the new mount.
        let rec = o.propagation.contains(MsFlags::MS_REC);
        let p = (o.propagation & !MsFlags::MS_REC).bits();
        setattr(tree.as_fd(), rec, Attr::default(), p)
            .map_err(|e| MountError::io(step("set its propagation"), e))?;
    }
    Ok(())
}

/// What `mount(2)` cannot set on a new filesystem's mount, applied once it is mounted
/// (`mounted`: its root, found again): the recursive attributes (`rro`, `rnosuid`...) and the
/// propagation.
pub fn finish_fs_mount(mounted: BorrowedFd<'_>, o: &MountOptions) -> Result<(), MountError> {
    if !o.all.is_empty() {
        setattr(mounted, true, o.all, 0)
            .map_err(|e| MountError::io("set the attributes of it and its submounts", e))?;
    }
    if !o.propagation.is_empty() {
        let rec = o.propagation.contains(MsFlags::MS_REC);
        let p = (o.propagation & !MsFlags::MS_REC).bits();
        setattr(mounted, rec, Attr::default(), p)
            .map_err(|e| MountError::io("set its propagation", e))?;
    }
    Ok(())
}

/// Mounts a new filesystem (`fstype`, e.g. tmpfs) on the mount point `target`; what
/// `mount(2)` cannot set is then [`finish_fs_mount`]'s.
pub fn mount_fs(
    source: &str,
    fstype: &str,
    target: &OwnedFd,
    o: &MountOptions,
) -> Result<(), MountError> {
    let at = crate::safe::proc_path(target);
    let data = o.data();
    nix::mount::mount(
        Some(if source.is_empty() { fstype } else { source }),
        &at,
        Some(fstype),
        o.flags,
        data.as_deref(),
    )
    .map_err(|e| MountError::Filesystem {
        fstype: fstype.to_string(),
        source_name: source.to_string(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::{create_in_root, open_dir, Kind};
    use std::os::fd::AsFd;

    /// Runs `f` as root in a private mount namespace (a child process), so the host's mounts
    /// are untouched, with a fresh temporary directory; skipped when not root.
    fn in_private_ns(f: impl FnOnce(&Path) -> Result<(), Box<dyn std::error::Error>>) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (make test runs it as root)");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let base = t.path();
        // SAFETY: the child only runs `f` and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .map_err(Box::<dyn std::error::Error>::from)
                    .and_then(|_| {
                        nix::mount::mount(
                            None::<&str>,
                            "/",
                            None::<&str>,
                            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                            None::<&str>,
                        )
                        .map_err(Box::<dyn std::error::Error>::from)
                    })
                    .and_then(|_| f(base))
                {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("{e}");
                        1
                    }
                };
                std::process::exit(code)
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }

    fn writable(p: &Path) -> bool {
        std::fs::write(p.join(".probe"), "x").is_ok()
    }

    #[test]
    fn ro_stops_at_the_top_and_rro_reaches_submounts() {
        in_private_ns(|base| {
            let src = base.join("src");
            let sub = src.join("sub");
            std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
            // A submount (a tmpfs) inside the source.
            nix::mount::mount(
                Some("tmpfs"),
                &sub,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| e.to_string())?;
            let r = open_dir(base).map_err(|e| e.to_string())?;
            for (name, opts, top_rw, sub_rw) in [
                ("ro", &["rbind", "ro"][..], false, true),
                ("rro", &["rbind", "rro"][..], false, false),
                ("rw", &["rbind", "rw"][..], true, true),
            ] {
                let o = crate::options::parse(
                    &opts.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    true,
                )?;
                let dest = format!("/{name}");
                let fd = create_in_root(r.as_fd(), Path::new(&dest), Kind::Dir)?;
                bind(&src, fd.as_fd(), &o)?;
                let at = base.join(name);
                if writable(&at) != top_rw || writable(&at.join("sub")) != sub_rw {
                    return Err(format!(
                        "{name}: top writable {}, submount writable {}",
                        writable(&at),
                        writable(&at.join("sub"))
                    )
                    .into());
                }
            }
            Ok(())
        });
    }

    #[test]
    fn a_mount_through_an_image_symlink_lands_inside_the_root() {
        in_private_ns(|base| {
            let rootfs = base.join("rootfs");
            let vol = base.join("vol");
            std::fs::create_dir_all(&rootfs).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&vol).map_err(|e| e.to_string())?;
            std::fs::write(vol.join("marker"), "vol").map_err(|e| e.to_string())?;
            std::os::unix::fs::symlink("/", rootfs.join("escape")).map_err(|e| e.to_string())?;
            let r = open_dir(&rootfs).map_err(|e| e.to_string())?;
            let fd = create_in_root(r.as_fd(), Path::new("/escape/x"), Kind::Dir)?;
            let o = crate::options::parse(&["rbind".to_string()], true)?;
            bind(&vol, fd.as_fd(), &o)?;
            if !rootfs.join("x/marker").exists() || Path::new("/x").exists() {
                return Err("the mount did not land at <root>/x".into());
            }
            // With the container's proc mounted, /proc/self/root is a magic link to the real
            // root: refused, never followed.
            std::fs::create_dir_all(rootfs.join("proc")).map_err(|e| e.to_string())?;
            nix::mount::mount(
                Some("proc"),
                &rootfs.join("proc"),
                Some("proc"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| e.to_string())?;
            std::os::unix::fs::symlink("/proc/self/root", rootfs.join("magic"))
                .map_err(|e| e.to_string())?;
            match create_in_root(r.as_fd(), Path::new("/magic/etc/y"), Kind::Dir) {
                Ok(fd) => {
                    let at = std::fs::read_link(crate::safe::proc_path(&fd))
                        .map_err(|e| e.to_string())?;
                    return Err(format!("followed the magic link to {}", at.display()).into());
                }
                Err(e) if e.to_string().contains("/magic") => {}
                Err(e) => return Err(format!("unexpected error: {e}").into()),
            }
            if Path::new("/etc/y").exists() {
                return Err("made /etc/y on the host".into());
            }
            Ok(())
        });
    }

    #[test]
    fn rro_on_a_new_filesystem_reaches_its_submounts() {
        in_private_ns(|base| {
            let r = open_dir(base).map_err(|e| e.to_string())?;
            let fd = create_in_root(r.as_fd(), Path::new("/fs"), Kind::Dir)?;
            let o = crate::options::parse(&["rro".to_string(), "size=1m".to_string()], false)?;
            mount_fs("tmpfs", "tmpfs", &fd, &o)?;
            // A submount made before the attributes are applied (as a later mount of the spec
            // would not be, but a recursive attribute must reach whatever is there).
            let sub = base.join("fs/sub");
            std::fs::create_dir(&sub).map_err(|e| e.to_string())?;
            nix::mount::mount(
                Some("tmpfs"),
                &sub,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| e.to_string())?;
            let mounted = crate::safe::open_in_root(r.as_fd(), Path::new("/fs"))
                .map_err(|e| e.to_string())?;
            finish_fs_mount(mounted.as_fd(), &o)?;
            if writable(&base.join("fs")) || writable(&sub) {
                return Err("rro on a tmpfs left it or its submount writable".into());
            }
            Ok(())
        });
    }
}
