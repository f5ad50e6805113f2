//! The payload: the `/opt/kata` tree of a build, with a `MANIFEST` of each file's SHA-256. On
//! the node it is copied next to earlier releases (`<prefix>-releases/<release>`), verified, and
//! made current by one rename of the `<prefix>` symlink: a sandbox started from the old release
//! keeps its files.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::DeployError;

/// The manifest's name in a payload directory.
pub const MANIFEST: &str = "MANIFEST";
/// The tree's directory in a payload directory.
pub const TREE: &str = "kata";
/// The prefix the payload's configuration files name.
pub const BUILD_PREFIX: &str = "/opt/kata";

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeployError {
    let what = what.into();
    move |source| DeployError::Io { what, source }
}

fn sha256(path: &Path) -> Result<String, DeployError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Every regular file and symlink under `root`, relative, sorted.
fn walk(root: &Path) -> Result<Vec<PathBuf>, DeployError> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).map_err(io(format!("list {}", dir.display())))? {
            let e = e.map_err(io(format!("list {}", dir.display())))?;
            let ft = e
                .file_type()
                .map_err(io(format!("stat {}", e.path().display())))?;
            let r = rel.join(e.file_name());
            if ft.is_dir() {
                todo.push(r);
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The manifest text of a tree: `SHA256  PATH` per regular file, `symlink  PATH -> TARGET` per
/// link, sorted by path.
pub fn manifest_of(tree: &Path) -> Result<String, DeployError> {
    let mut text = String::new();
    for rel in walk(tree)? {
        let p = tree.join(&rel);
        let md = std::fs::symlink_metadata(&p).map_err(io(format!("stat {}", p.display())))?;
        if md.file_type().is_symlink() {
            let t = std::fs::read_link(&p).map_err(io(format!("readlink {}", p.display())))?;
            text.push_str(&format!("symlink  {} -> {}\n", rel.display(), t.display()));
        } else {
            text.push_str(&format!("{}  {}\n", sha256(&p)?, rel.display()));
        }
    }
    Ok(text)
}

/// Writes the payload's manifest (the image build's step).
pub fn write_manifest(payload: &Path) -> Result<(), DeployError> {
    let text = manifest_of(&payload.join(TREE))?;
    let m = payload.join(MANIFEST);
    std::fs::write(&m, text).map_err(io(format!("write {}", m.display())))
}

/// Checks `tree` against the manifest `expected`; the first difference is the error.
pub fn verify(tree: &Path, expected: &str) -> Result<(), DeployError> {
    let got = manifest_of(tree)?;
    if got == expected {
        return Ok(());
    }
    let diff = expected
        .lines()
        .zip(got.lines())
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("expected `{a}`, found `{b}`"))
        .unwrap_or_else(|| "a file is missing or extra".into());
    Err(DeployError::Payload(format!(
        "{} does not match its manifest: {diff}",
        tree.display()
    )))
}

/// Where releases of `prefix` live under `host_root`.
pub fn releases_dir(host_root: &Path, prefix: &Path) -> PathBuf {
    let p = host_root.join(prefix.strip_prefix("/").unwrap_or(prefix));
    let name = format!(
        "{}-releases",
        p.file_name().and_then(|n| n.to_str()).unwrap_or("kata")
    );
    p.with_file_name(name)
}

/// `prefix` under `host_root`.
pub fn prefix_on_host(host_root: &Path, prefix: &Path) -> PathBuf {
    host_root.join(prefix.strip_prefix("/").unwrap_or(prefix))
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), DeployError> {
    for rel in walk(from)? {
        let (src, dst) = (from.join(&rel), to.join(&rel));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        let md = std::fs::symlink_metadata(&src).map_err(io(format!("stat {}", src.display())))?;
        if md.file_type().is_symlink() {
            let t = std::fs::read_link(&src).map_err(io(format!("readlink {}", src.display())))?;
            std::os::unix::fs::symlink(&t, &dst)
                .map_err(io(format!("symlink {}", dst.display())))?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(format!("copy {}", src.display())))?;
            std::fs::set_permissions(
                &dst,
                std::fs::Permissions::from_mode(md.permissions().mode()),
            )
            .map_err(io(format!("chmod {}", dst.display())))?;
        }
    }
    Ok(())
}

/// The configuration files of a tree with `/opt/kata/` paths rewritten to `prefix` (for a node
/// that installs elsewhere). Key by key would change nothing more: these are our own files and
/// the paths are whole values.
fn relocate(tree: &Path, prefix: &Path) -> Result<(), DeployError> {
    if prefix == Path::new(BUILD_PREFIX) {
        return Ok(());
    }
    let dir = tree.join("share/defaults/kata-containers");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") || p.is_symlink() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(io(format!("read {}", p.display())))?;
        let moved = text.replace(
            &format!("\"{BUILD_PREFIX}/"),
            &format!("\"{}/", prefix.display()),
        );
        std::fs::write(&p, moved).map_err(io(format!("write {}", p.display())))?;
    }
    Ok(())
}

/// Copies the payload's tree to `<releases>/<release>` (once; a complete earlier copy is
/// verified and kept) and makes it current: `<prefix>` becomes a symlink to it by one rename.
/// Returns the release's directory.
pub fn install(
    payload: &Path,
    host_root: &Path,
    prefix: &Path,
    release: &str,
) -> Result<PathBuf, DeployError> {
    if release.is_empty() || release.contains('/') || release.starts_with('.') {
        return Err(DeployError::Payload(format!(
            "release {release:?} is not a plain name"
        )));
    }
    let manifest_path = payload.join(MANIFEST);
    let manifest = std::fs::read_to_string(&manifest_path)
        .map_err(io(format!("read {}", manifest_path.display())))?;
    verify(&payload.join(TREE), &manifest)?;
    let releases = releases_dir(host_root, prefix);
    let dest = releases.join(release);
    if !dest.exists() {
        let tmp = releases.join(format!(".{release}.partial"));
        if tmp.exists() {
            // An install killed while copying.
            std::fs::remove_dir_all(&tmp).map_err(io(format!("remove {}", tmp.display())))?;
        }
        copy_tree(&payload.join(TREE), &tmp)?;
        verify(&tmp, &manifest)?;
        relocate(&tmp, prefix)?;
        std::fs::rename(&tmp, &dest).map_err(io(format!("rename to {}", dest.display())))?;
    }
    let link = prefix_on_host(host_root, prefix);
    match std::fs::symlink_metadata(&link) {
        Ok(md) if !md.file_type().is_symlink() => {
            return Err(DeployError::Payload(format!(
                "{} exists and is not kata-deploy's (a {}); remove it (an install from source: \
                 make uninstall) or pass --prefix",
                link.display(),
                if md.is_dir() { "directory" } else { "file" }
            )))
        }
        _ => {}
    }
    let target = Path::new(
        releases
            .file_name()
            .ok_or_else(|| DeployError::Payload("bad prefix".into()))?,
    )
    .join(release);
    let new = link.with_file_name(".kata-deploy-link.new");
    let _ = std::fs::remove_file(&new);
    std::os::unix::fs::symlink(&target, &new).map_err(io(format!("symlink {}", new.display())))?;
    std::fs::rename(&new, &link).map_err(io(format!("rename to {}", link.display())))?;
    Ok(dest)
}

/// Removes `<prefix>` (when it is kata-deploy's symlink) and every release.
pub fn uninstall(host_root: &Path, prefix: &Path) -> Result<(), DeployError> {
    let link = prefix_on_host(host_root, prefix);
    if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&link).map_err(io(format!("remove {}", link.display())))?;
    }
    let releases = releases_dir(host_root, prefix);
    match std::fs::remove_dir_all(&releases) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("remove {}", releases.display()))(e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(dir: &Path, content: &str) -> PathBuf {
        let p = dir.join("payload");
        let tree = p.join(TREE);
        std::fs::create_dir_all(tree.join("bin")).expect("mkdir");
        std::fs::create_dir_all(tree.join("share/defaults/kata-containers")).expect("mkdir");
        std::fs::write(tree.join("bin/containerd-shim-kata-v2"), content).expect("write");
        std::fs::write(
            tree.join("share/defaults/kata-containers/configuration-qemu.toml"),
            "kernel = \"/opt/kata/share/kata-containers/vmlinux\"\n",
        )
        .expect("write");
        std::os::unix::fs::symlink(
            "configuration-qemu.toml",
            tree.join("share/defaults/kata-containers/configuration.toml"),
        )
        .expect("ln");
        write_manifest(&p).expect("manifest");
        p
    }

    #[test]
    fn releases_side_by_side_switched_by_one_rename() {
        let t = tempfile::tempdir().expect("tempdir");
        let host = t.path().join("host");
        std::fs::create_dir_all(host.join("opt")).expect("mkdir");
        let prefix = Path::new("/opt/kata-test");
        let one = payload(&t.path().join("1"), "one");
        install(&one, &host, prefix, "1.0").expect("install 1.0");
        let cur = host.join("opt/kata-test");
        assert_eq!(
            std::fs::read_to_string(cur.join("bin/containerd-shim-kata-v2")).expect("read"),
            "one"
        );
        // Relocated to the prefix; the symlink kept.
        let cfg = cur.join("share/defaults/kata-containers/configuration.toml");
        assert_eq!(
            std::fs::read_to_string(&cfg).expect("read"),
            "kernel = \"/opt/kata-test/share/kata-containers/vmlinux\"\n"
        );
        let two = payload(&t.path().join("2"), "two");
        install(&two, &host, prefix, "2.0").expect("install 2.0");
        assert_eq!(
            std::fs::read_link(&cur).expect("link"),
            Path::new("kata-test-releases/2.0")
        );
        // The old release is still whole for sandboxes that run from it.
        assert!(host.join("opt/kata-test-releases/1.0/bin").exists());
        // Again: idempotent.
        install(&two, &host, prefix, "2.0").expect("again");
        uninstall(&host, prefix).expect("uninstall");
        uninstall(&host, prefix).expect("uninstall again");
        assert_eq!(
            std::fs::read_dir(host.join("opt")).expect("ls").count(),
            0,
            "nothing left"
        );
    }

    #[test]
    fn a_corrupt_payload_or_a_foreign_prefix_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let host = t.path().join("host");
        let p = payload(t.path(), "one");
        std::fs::write(p.join(TREE).join("bin/containerd-shim-kata-v2"), "tampered").expect("w");
        let e = install(&p, &host, Path::new("/opt/kata"), "1.0").expect_err("corrupt");
        assert!(e.to_string().contains("does not match its manifest"), "{e}");
        write_manifest(&p).expect("manifest");
        std::fs::create_dir_all(host.join("opt/kata")).expect("a source install");
        let e = install(&p, &host, Path::new("/opt/kata"), "1.0").expect_err("foreign");
        assert!(e.to_string().contains("is not kata-deploy's"), "{e}");
        assert!(install(&p, &host, Path::new("/opt/x"), "../1").is_err());
    }

    #[test]
    fn an_install_killed_while_copying_is_finished_by_the_next() {
        let t = tempfile::tempdir().expect("tempdir");
        let host = t.path().join("host");
        let p = payload(t.path(), "one");
        let partial = host.join("opt/kata-releases/.1.0.partial/bin");
        std::fs::create_dir_all(&partial).expect("mkdir");
        std::fs::write(partial.join("half"), "x").expect("write");
        install(&p, &host, Path::new("/opt/kata"), "1.0").expect("install");
        verify(
            &host.join("opt/kata-releases/1.0"),
            &manifest_of(&p.join(TREE)).expect("m"),
        )
        .expect("whole");
    }
}
