//! Paths inside a root that someone else wrote (a container image, a guest), resolved without
//! ever leaving it: `openat2(RESOLVE_IN_ROOT)` makes every symlink and `..` resolve as if the
//! root were `/`, missing directories are made one `mkdirat` at a time below a descriptor (never
//! through a path that could have changed), and the result is a descriptor. Mounting on
//! `/proc/self/fd/N` then mounts on exactly what was resolved, even if a symlink is swapped in
//! afterwards (CVE-2020-2026, kata-containers#885).

use crate::error::MountError;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// `RESOLVE_NO_MAGICLINKS`.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
/// `RESOLVE_IN_ROOT`.
const RESOLVE_IN_ROOT: u64 = 0x10;

/// What to create at a missing mount point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory (for a directory or a filesystem).
    Dir,
    /// An empty file (for a bind mount of a file).
    File,
}

fn cstr(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a directory as an `O_PATH` descriptor (the root to resolve in).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: open(2) with a valid C string; the returned descriptor is owned here.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just returned by open(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `dest` as a relative path with `.` dropped and `..` applied lexically (never above the
/// root); symlinks are left to [`open_in_root`].
pub fn clean(dest: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in dest.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Opens `rel` below `root` (`O_PATH`), resolving symlinks and `..` inside `root`.
pub fn open_in_root(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let rel = clean(rel);
    let bytes = if rel.as_os_str().is_empty() {
        &b"."[..]
    } else {
        rel.as_os_str().as_bytes()
    };
    let c = cstr(bytes)?;
    // SAFETY: open_how is plain data; zero is valid for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) reads `how` and the C string, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by openat2(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Why `path` could not be resolved, and what to do about the common case.
fn resolve_error(path: &Path, e: io::Error) -> MountError {
    let hint = if e.raw_os_error() == Some(libc::ELOOP) {
        " (a symlink on the way leads through a /proc magic link such as /proc/self/root, or \
         loops; change the image or the mount's destination)"
    } else {
        ""
    };
    MountError::Io {
        context: format!("resolve {} in the root", path.display()),
        hint,
        source: e,
    }
}

fn is_symlink(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: fstat(2) fills a zeroed stat struct for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

/// Opens `dest` below `root` like [`open_in_root`], first creating what is missing (directories,
/// and the last component as `kind`) one component at a time below descriptors: a component
/// that turns into a symlink meanwhile is an error, never followed.
pub fn create_in_root(
    root: BorrowedFd<'_>,
    dest: &Path,
    kind: Kind,
) -> Result<OwnedFd, MountError> {
    create_inner(root, dest, kind, 0)
}

fn create_inner(
    root: BorrowedFd<'_>,
    dest: &Path,
    kind: Kind,
    depth: u32,
) -> Result<OwnedFd, MountError> {
    if depth > 40 {
        return Err(resolve_error(
            dest,
            io::Error::from_raw_os_error(libc::ELOOP),
        ));
    }
    let rel = clean(dest);
    let shown = Path::new("/").join(&rel);
    match open_in_root(root, &rel) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(resolve_error(&shown, e)),
    }
    let comps: Vec<&std::ffi::OsStr> = rel.iter().collect();
    // The deepest part that exists.
    let mut have = comps.len().saturating_sub(1);
    let mut parent = loop {
        let prefix: PathBuf = comps[..have].iter().collect();
        match open_in_root(root, &prefix) {
            Ok(fd) => break fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && have > 0 => have -= 1,
            Err(e) => return Err(resolve_error(&Path::new("/").join(prefix), e)),
        }
    };
    for (i, name) in comps.iter().enumerate().skip(have) {
        let last = i + 1 == comps.len();
        let c = cstr(name.as_bytes()).map_err(|e| resolve_error(&shown, e))?;
        let made = if last && kind == Kind::File {
            // SAFETY: openat(2) relative to a descriptor we own; closed right away.
            let fd = unsafe {
                libc::openat(
                    parent.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_WRONLY
                        | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                // SAFETY: closing the descriptor just opened.
                unsafe { libc::close(fd) };
            }
            fd
        } else {
            // SAFETY: mkdirat(2) relative to a descriptor we own.
            unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o755) }
        };
        let mut existed = false;
        if made < 0 {
            let e = io::Error::last_os_error();
            existed = e.raw_os_error() == Some(libc::EEXIST);
            if !existed {
                let at: PathBuf = comps[..=i].iter().collect();
                return Err(MountError::io(
                    format!("create {} in the root", Path::new("/").join(at).display()),
                    e,
                ));
            }
        }
        let mut flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        if !last || kind == Kind::Dir {
            flags |= libc::O_DIRECTORY;
        }
        let at: PathBuf = comps[..=i].iter().collect();
        if existed {
            // A dangling symlink (its target is missing): continue from its target, resolved
            // inside the root like any other path (runc's securejoin does the same).
            let mut buf = [0u8; libc::PATH_MAX as usize];
            // SAFETY: readlinkat(2) writes at most buf.len() bytes into buf.
            let n = unsafe {
                libc::readlinkat(
                    parent.as_raw_fd(),
                    c.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n >= 0 {
                let target = Path::new(std::ffi::OsStr::from_bytes(&buf[..n as usize]));
                let mut next: PathBuf = comps[..i].iter().collect();
                next.push(target); // an absolute target replaces the prefix
                for rest in &comps[i + 1..] {
                    next.push(rest);
                }
                return create_inner(root, &next, kind, depth + 1);
            }
        }
        // SAFETY: openat(2) relative to a descriptor we own.
        let fd = unsafe { libc::openat(parent.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            return Err(MountError::Io {
                context: format!("open {} in the root", Path::new("/").join(at).display()),
                hint: " (did it change while it was being made?)",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: a descriptor just returned by openat(2).
        let next = unsafe { OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsFd;
        let shown_at = Path::new("/").join(&at);
        if is_symlink(next.as_fd()).map_err(|e| resolve_error(&shown_at, e))? {
            return Err(MountError::raced(
                &shown_at,
                "turned into a symlink while it was being made; refusing to follow it",
            ));
        }
        parent = next;
    }
    Ok(parent)
}

/// The `/proc/self/fd/N` path of a descriptor, for calls that take a path.
pub fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    fn real(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(proc_path(fd)).expect("readlink")
    }

    #[test]
    fn cleaning_never_climbs_above_the_root() {
        assert_eq!(clean(Path::new("/a/./b/../c")), PathBuf::from("a/c"));
        assert_eq!(clean(Path::new("/../../etc")), PathBuf::from("etc"));
        assert_eq!(clean(Path::new("/")), PathBuf::new());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let outside = tempfile::tempdir().expect("tmp");
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        symlink("/", root.join("escape")).expect("symlink");
        symlink("/proc/self/root", root.join("proc-root")).expect("symlink");
        symlink("../../../../..", root.join("dots")).expect("symlink");
        symlink(outside.path(), root.join("abs")).expect("symlink");
        let r = open_dir(&root).expect("open root");
        let cases = [
            ("/escape/x", root.join("x")),
            ("/dots/real/y", root.join("real/y")),
            (
                "/abs/z",
                root.join(outside.path().strip_prefix("/").expect("abs"))
                    .join("z"),
            ),
            ("/real/../../../w", root.join("w")),
        ];
        for (dest, want) in cases {
            let fd = create_in_root(r.as_fd(), Path::new(dest), Kind::Dir).expect(dest);
            assert_eq!(real(&fd), want, "{dest}");
        }
        // Without a proc in the root, /proc/self/root is just a path inside it.
        let fd = create_in_root(r.as_fd(), Path::new("/proc-root/etc"), Kind::Dir).expect("made");
        assert_eq!(real(&fd), root.join("proc/self/root/etc"));
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            0,
            "nothing made outside"
        );
    }

    #[test]
    fn files_are_made_for_file_mounts() {
        let t = tempfile::tempdir().expect("tmp");
        let r = open_dir(t.path()).expect("open root");
        let fd = create_in_root(r.as_fd(), Path::new("/etc/hosts"), Kind::File).expect("file");
        assert_eq!(real(&fd), t.path().join("etc/hosts"));
        assert!(t.path().join("etc/hosts").is_file());
        // Existing: opened, not recreated.
        std::fs::write(t.path().join("etc/hosts"), "x").expect("write");
        create_in_root(r.as_fd(), Path::new("/etc/hosts"), Kind::File).expect("again");
        assert_eq!(
            std::fs::read_to_string(t.path().join("etc/hosts")).expect("read"),
            "x"
        );
    }

    #[test]
    fn a_dangling_symlink_is_made_inside_the_root() {
        // /data -> /nonexistent/dir: the directories are made inside the root, not on the host.
        let t = tempfile::tempdir().expect("tmp");
        let host = Path::new("/nonexistent-kata-test/dir");
        symlink(host, t.path().join("data")).expect("symlink");
        let r = open_dir(t.path()).expect("open root");
        let fd = create_in_root(r.as_fd(), Path::new("/data/v"), Kind::Dir).expect("made");
        // The symlink's missing target is made under the root (as runc's securejoin does).
        assert!(!Path::new("/nonexistent-kata-test").exists());
        assert!(real(&fd).starts_with(t.path()), "{}", real(&fd).display());
    }

    #[test]
    fn a_symlink_swapped_in_meanwhile_never_leads_out() {
        // A racer turns /race into a symlink to the real / and back while mount points under
        // it are made: every result is inside the root or an error, never outside.
        let outside = tempfile::tempdir().expect("tmp");
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racer = {
            let (root, target, stop) = (root.clone(), outside.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::remove_dir_all(root.join("race"));
                    let _ = symlink(&target, root.join("race"));
                    let _ = std::fs::remove_file(root.join("race"));
                    let _ = std::fs::create_dir(root.join("race"));
                }
            })
        };
        let r = open_dir(&root).expect("open root");
        let mut inside = 0;
        for i in 0..2000 {
            let dest = format!("/race/d{i}/e");
            if let Ok(fd) = create_in_root(r.as_fd(), Path::new(&dest), Kind::Dir) {
                let at = real(&fd);
                // Removed by the racer meanwhile: the kernel appends " (deleted)".
                assert!(at.starts_with(&root), "{dest} resolved to {}", at.display());
                inside += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        racer.join().expect("racer");
        assert!(inside > 0, "some attempts succeed");
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            0,
            "nothing was made outside the root"
        );
    }
}
