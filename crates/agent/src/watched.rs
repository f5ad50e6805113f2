//! Watched volumes in guest memory (CopyFile, RemoveFile): the runtime mirrors a Kubernetes
//! ConfigMap, Secret, projected or downward-API volume here, so that an update on the host (the
//! kubelet swapping its `..data` symlink) is an update in the guest that inotify reports to the
//! container. Every path is confined under [`WATCHABLE_ROOT`]: only plain components, parents
//! resolved inside the root, the last component never followed. A file is written to a
//! temporary name and renamed into place once complete, a symlink is made beside and renamed
//! over the old one, as the kubelet does on the host.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use kata_protocols::agent::CopyFileRequest;

use crate::error::{invalid, step, GuestError};

/// Where watched volumes live in the guest (Kata's `watchable` directory of the shared root).
pub const WATCHABLE_ROOT: &str = "/run/kata-containers/shared/watchable";

/// The largest chunk one CopyFile may carry.
pub const MAX_CHUNK: usize = 1 << 20;

/// `rel` split into its parent and last component, when `path` lies strictly below `root` and
/// has only plain components.
pub fn confine<'a>(root: &Path, path: &'a str) -> Result<(PathBuf, &'a OsStr), GuestError> {
    let bad = || {
        invalid(format!(
            "{path:?} is not a path below {} (absolute, plain components only)",
            root.display()
        ))
    };
    let rel = Path::new(path).strip_prefix(root).map_err(|_| bad())?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) || rel.as_os_str().is_empty() {
        return Err(bad());
    }
    let name = rel.file_name().ok_or_else(bad)?;
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((parent, name))
}

fn cstr(s: &[u8]) -> Result<std::ffi::CString, GuestError> {
    std::ffi::CString::new(s).map_err(|_| invalid("a NUL byte in a watched path"))
}

fn temp_name(name: &OsStr) -> Vec<u8> {
    let mut t = b".kata-copy.".to_vec();
    t.extend_from_slice(name.as_bytes());
    t
}

/// The parent directory of `path` under `root`, created (0755) when missing.
fn parent_dir(root: &Path, parent: &Path) -> Result<OwnedFd, GuestError> {
    std::fs::create_dir_all(root).map_err(step(format!("create {}", root.display())))?;
    let root_fd = kata_mount::open_dir(root).map_err(step(format!("open {}", root.display())))?;
    kata_mount::create_in_root(root_fd.as_fd(), parent, kata_mount::Kind::Dir).map_err(step(
        format!("create {}/{}", root.display(), parent.display()),
    ))
}

fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<libc::mode_t>, GuestError> {
    let c = cstr(name)?;
    // SAFETY: a zeroed stat is valid; fstatat(2) fills it for a valid descriptor and C string.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        return Ok(Some(st.st_mode & libc::S_IFMT));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(step("stat a watched path")(e))
    }
}

/// Removes `name` in `dir` whatever it is (a directory tree, never following a symlink).
fn remove_at(dir: &OwnedFd, name: &[u8]) -> Result<(), GuestError> {
    let Some(kind) = lstat_at(dir.as_fd(), name)? else {
        return Ok(());
    };
    let path = kata_mount::safe::proc_path(dir).join(OsStr::from_bytes(name));
    let r = if kind == libc::S_IFDIR {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(step(format!("remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn check(rc: libc::c_int, what: &str) -> Result<libc::c_int, GuestError> {
    if rc < 0 {
        Err(step(what.to_string())(io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

/// CopyFile under `root`.
pub fn copy_file(root: &Path, req: &CopyFileRequest) -> Result<(), GuestError> {
    let (parent, name) = confine(root, &req.path)?;
    if req.data.len() > MAX_CHUNK {
        return Err(invalid(format!(
            "CopyFile {}: a chunk of {} bytes (at most {MAX_CHUNK})",
            req.path,
            req.data.len()
        )));
    }
    // Missing parents are made 0755; another mode for them is not honoured, so refused (the
    // runtime copies each directory itself, with its mode, before what is in it).
    if req.dir_mode != 0 && req.dir_mode & 0o7777 != 0o755 {
        return Err(invalid(format!(
            "CopyFile {}: dir_mode {:o} is not supported (0 or 0755); copy the directory first \
             with its mode (file_mode S_IFDIR)",
            req.path, req.dir_mode
        )));
    }
    let dir = parent_dir(root, &parent)?;
    let cname = cstr(name.as_bytes())?;
    let perm = req.file_mode & 0o7777;
    let what = |op: &str| format!("{op} {}", req.path);
    match req.file_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            match lstat_at(dir.as_fd(), name.as_bytes())? {
                Some(libc::S_IFDIR) => {}
                Some(_) => {
                    remove_at(&dir, name.as_bytes())?;
                    mkdir(&dir, &cname, &what("mkdir"))?;
                }
                None => mkdir(&dir, &cname, &what("mkdir"))?,
            }
            // SAFETY: openat(2) with a valid descriptor and C string; the result is owned.
            let fd = check(
                unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                },
                &what("open"),
            )?;
            // SAFETY: fd was just returned by openat(2).
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            own(fd.as_fd(), perm, req.uid, req.gid, &what("chmod/chown"))
        }
        libc::S_IFLNK => {
            let tmp = cstr(&temp_name(name))?;
            let target = cstr(&req.data)?;
            remove_at(&dir, tmp.as_bytes())?;
            // SAFETY: symlinkat(2) with valid C strings and descriptor.
            check(
                unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), tmp.as_ptr()) },
                &what("symlink"),
            )?;
            // SAFETY: fchownat(2) on the link itself (AT_SYMLINK_NOFOLLOW).
            let _ = unsafe {
                libc::fchownat(
                    dir.as_raw_fd(),
                    tmp.as_ptr(),
                    req.uid as libc::uid_t,
                    req.gid as libc::gid_t,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if lstat_at(dir.as_fd(), name.as_bytes())? == Some(libc::S_IFDIR) {
                remove_at(&dir, name.as_bytes())?;
            }
            rename_in(&dir, &tmp, &cname, &what("rename"))
        }
        _ => {
            let tmp = cstr(&temp_name(name))?;
            let flags = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            let flags = if req.offset == 0 {
                flags | libc::O_CREAT | libc::O_TRUNC
            } else {
                flags
            };
            if req.offset == 0 && lstat_at(dir.as_fd(), tmp.as_bytes())?.is_some() {
                remove_at(&dir, tmp.as_bytes())?;
            }
            // SAFETY: openat(2) with a valid descriptor and C string; the result is owned.
            let fd = check(
                unsafe { libc::openat(dir.as_raw_fd(), tmp.as_ptr(), flags, 0o600) },
                &what("open"),
            )?;
            // SAFETY: fd was just returned by openat(2).
            let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let offset = u64::try_from(req.offset)
                .map_err(|_| invalid(format!("CopyFile {}: offset {}", req.path, req.offset)))?;
            std::os::unix::fs::FileExt::write_all_at(&file, &req.data, offset)
                .map_err(step(what("write")))?;
            if offset + req.data.len() as u64 >= u64::try_from(req.file_size).unwrap_or(0) {
                own(file.as_fd(), perm, req.uid, req.gid, &what("chmod/chown"))?;
                if lstat_at(dir.as_fd(), name.as_bytes())? == Some(libc::S_IFDIR) {
                    remove_at(&dir, name.as_bytes())?;
                }
                rename_in(&dir, &tmp, &cname, &what("rename"))?;
            }
            Ok(())
        }
    }
}

fn mkdir(dir: &OwnedFd, name: &std::ffi::CStr, what: &str) -> Result<(), GuestError> {
    // SAFETY: mkdirat(2) with a valid descriptor and C string.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
    if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
        return Err(step(what.to_string())(io::Error::last_os_error()));
    }
    Ok(())
}

fn own(fd: BorrowedFd<'_>, perm: u32, uid: i32, gid: i32, what: &str) -> Result<(), GuestError> {
    // SAFETY: fchown(2)/fchmod(2) on a valid descriptor.
    check(
        unsafe { libc::fchown(fd.as_raw_fd(), uid as libc::uid_t, gid as libc::gid_t) },
        what,
    )?;
    check(unsafe { libc::fchmod(fd.as_raw_fd(), perm) }, what)?;
    Ok(())
}

fn rename_in(
    dir: &OwnedFd,
    from: &std::ffi::CStr,
    to: &std::ffi::CStr,
    what: &str,
) -> Result<(), GuestError> {
    // SAFETY: renameat(2) within one directory descriptor, valid C strings.
    check(
        unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) },
        what,
    )
    .map(|_| ())
}

/// RemoveFile under `root`: a file, link or directory tree; already gone is fine.
pub fn remove_file(root: &Path, path: &str) -> Result<(), GuestError> {
    let (parent, name) = confine(root, path)?;
    let root_fd = match kata_mount::open_dir(root) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(step(format!("open {}", root.display()))(e)),
    };
    let dir = match kata_mount::open_in_root(root_fd.as_fd(), &parent) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(step(format!("open the parent of {path}"))(e)),
    };
    remove_at(&dir, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &Path, mode: u32, data: &[u8], offset: i64, size: i64) -> CopyFileRequest {
        CopyFileRequest {
            path: path.display().to_string(),
            file_size: size,
            file_mode: mode,
            dir_mode: 0o755,
            uid: nix::unistd::geteuid().as_raw() as i32,
            gid: nix::unistd::getegid().as_raw() as i32,
            offset,
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn paths_are_confined_to_the_root() {
        let root = Path::new("/w");
        assert!(confine(root, "/w/a/b").is_ok());
        for bad in [
            "/w",
            "/w/",
            "/x/a",
            "/w/../etc/passwd",
            "/w/a/../../b",
            "w/a",
        ] {
            assert!(confine(root, bad).is_err(), "{bad} accepted");
        }
        let (parent, name) = confine(root, "/w/v/..data").expect("plain");
        assert_eq!(
            (parent.as_path(), name),
            (Path::new("v"), OsStr::new("..data"))
        );
    }

    #[test]
    fn mirrors_files_links_and_directories_as_the_kubelet_lays_them_out() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("watchable");
        let v = root.join("c1/0");
        copy_file(
            &root,
            &req(&v.join("..2026_1"), libc::S_IFDIR | 0o755, b"", 0, 0),
        )
        .expect("dir");
        // A file in two chunks: not visible under its name until complete.
        let f = v.join("..2026_1/key");
        copy_file(&root, &req(&f, libc::S_IFREG | 0o644, b"hel", 0, 5)).expect("chunk 1");
        assert!(!f.exists());
        copy_file(&root, &req(&f, libc::S_IFREG | 0o644, b"lo", 3, 5)).expect("chunk 2");
        assert_eq!(std::fs::read(&f).expect("read"), b"hello");
        copy_file(
            &root,
            &req(&v.join("..data"), libc::S_IFLNK, b"..2026_1", 0, 0),
        )
        .expect("ln");
        copy_file(
            &root,
            &req(&v.join("key"), libc::S_IFLNK, b"..data/key", 0, 0),
        )
        .expect("ln");
        assert_eq!(std::fs::read(v.join("key")).expect("read"), b"hello");
        // The update: a new directory, the ..data link swapped, the old one removed.
        copy_file(
            &root,
            &req(&v.join("..2026_2/key"), libc::S_IFREG | 0o600, b"bye", 0, 3),
        )
        .expect("file");
        copy_file(
            &root,
            &req(&v.join("..data"), libc::S_IFLNK, b"..2026_2", 0, 0),
        )
        .expect("ln");
        remove_file(&root, &v.join("..2026_1").display().to_string()).expect("rm");
        assert_eq!(std::fs::read(v.join("key")).expect("read"), b"bye");
        assert!(!v.join("..2026_1").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(v.join("..2026_2/key"))
            .expect("stat")
            .permissions();
        assert_eq!(mode.mode() & 0o7777, 0o600);
        // Removing what is gone is fine; removing the whole volume too.
        remove_file(&root, &v.join("..2026_1").display().to_string()).expect("rm again");
        remove_file(&root, &root.join("c1").display().to_string()).expect("rm all");
        assert!(!root.join("c1").exists());
    }

    #[test]
    fn a_symlink_in_the_tree_never_leads_a_write_out_of_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("watchable");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::create_dir_all(root.join("v")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("v/escape")).expect("ln");
        // Through the link: resolved inside the root (where nothing is), never outside.
        let _ = copy_file(
            &root,
            &req(&root.join("v/escape/x"), libc::S_IFREG | 0o644, b"no", 0, 2),
        );
        assert!(!outside.join("x").exists());
        // The link itself replaced by a directory, the target untouched.
        copy_file(
            &root,
            &req(&root.join("v/escape"), libc::S_IFDIR | 0o755, b"", 0, 0),
        )
        .expect("dir over link");
        assert!(root
            .join("v/escape")
            .symlink_metadata()
            .expect("stat")
            .is_dir());
        assert!(outside.exists());
        assert!(copy_file(
            &root,
            &req(
                &root.join("v/big"),
                libc::S_IFREG,
                &vec![0; MAX_CHUNK + 1],
                0,
                0
            )
        )
        .is_err());
    }
}
