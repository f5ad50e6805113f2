//! The guest image builder.
//!
//! - [`cpio`]: a deterministic `newc` archive writer (fixed inode numbers, mode, owner and
//!   mtime 0), so the same inputs give the same bytes;
//! - [`modules`]: `modules.dep` parsing and the dependency closure, in load order;
//! - [`build_initrd`]: the initrd: `/init` (kata-agent), `/dev/console`, optionally busybox for
//!   the debug console, and, for a kernel that has modules (Debian's generic one), the modules
//!   and their load list `/etc/kata-agent/modules`. The project's own kernel has everything
//!   built in, so its initrd carries no modules and the agent loads none.
//!
//! The initrd is not compressed: under TCG emulation the guest kernel's decompression costs more
//! than loading the larger file.

pub mod cpio;
pub mod disk;
pub mod kernel;
pub mod modules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Modules the runtime needs, by name; their dependencies are added from `modules.dep`.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "virtio_balloon",
    "vmw_vsock_virtio_transport",
    "9pnet_virtio",
    "9p",
    "virtiofs",
    "overlay",
    "crc32c_generic",
];

/// Errors of the builder.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A module is not in `modules.dep`.
    #[error("kernel module {0} is not in modules.dep (is it built in, or misspelt?)")]
    UnknownModule(String),
    /// A tool (mke2fs, debugfs) failed.
    #[error("{tool}: {detail}")]
    Tool {
        /// The tool.
        tool: String,
        /// What it said.
        detail: String,
    },
    /// The image is too large.
    #[error("the initrd would be {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// Size.
        size: usize,
        /// Limit.
        limit: usize,
    },
}

/// Inputs of an initrd.
#[derive(Debug, Clone, Default)]
pub struct InitrdSpec {
    /// The static kata-agent binary.
    pub agent: PathBuf,
    /// `/lib/modules/<release>` of the guest kernel (with `modules.dep`); `None` for a kernel
    /// with everything built in (no modules in the initrd, no load list).
    pub modules_dir: Option<PathBuf>,
    /// Module names to include (with dependencies).
    pub modules: Vec<String>,
    /// A static busybox to include as /bin/busybox (debug console), if any.
    pub busybox: Option<PathBuf>,
    /// Host directory trees to copy into the image: (source, absolute destination), e.g. guest
    /// hooks for `guest_hook_path`.
    pub trees: Vec<(PathBuf, String)>,
    /// The host's `xtables-legacy-multi`, copied with its shared libraries, its extensions
    /// (`xtables/*.so`) and the `ip(6)tables{,-save,-restore}` links in /sbin, for the agent's
    /// GetIPTables / SetIPTables.
    pub iptables: Option<PathBuf>,
}

/// Where Debian's iptables looks for its extensions (XTABLES_LIBDIR).
pub const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// The shared libraries (and the dynamic loader) `elf` needs, as `ldd` resolves them.
fn library_closure(elf: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let out = std::process::Command::new("ldd")
        .arg(elf)
        .output()
        .map_err(|source| BuildError::Read {
            path: PathBuf::from("ldd"),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if !out.status.success() || libs.is_empty() {
        return Err(BuildError::Read {
            path: elf.to_path_buf(),
            source: std::io::Error::other(format!(
                "ldd found no shared libraries: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
    }
    Ok(libs)
}

fn add_parents(files: &mut BTreeMap<String, cpio::Entry>, dest: &str) {
    let mut parent = Path::new(dest).parent();
    while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
        files
            .entry(p.display().to_string())
            .or_insert_with(|| cpio::Entry::dir(0o755));
        parent = p.parent();
    }
}

/// Adds iptables (see [`InitrdSpec::iptables`]).
fn add_iptables(files: &mut BTreeMap<String, cpio::Entry>, multi: &Path) -> Result<(), BuildError> {
    files.insert(
        "sbin/xtables-legacy-multi".into(),
        cpio::Entry::file(0o755, read(multi)?),
    );
    for name in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        files.insert(
            format!("sbin/{name}"),
            cpio::Entry::symlink("xtables-legacy-multi"),
        );
    }
    let mut elves = vec![multi.to_path_buf()];
    let mut exts: Vec<PathBuf> = std::fs::read_dir(XTABLES_DIR)
        .map_err(|source| BuildError::Read {
            path: PathBuf::from(XTABLES_DIR),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    exts.sort();
    for ext in &exts {
        let dest = ext
            .display()
            .to_string()
            .trim_start_matches('/')
            .to_string();
        add_parents(files, &dest);
        files.insert(dest, cpio::Entry::file(0o644, read(ext)?));
    }
    elves.extend(exts.iter().take(1).cloned());
    let mut libs = std::collections::BTreeSet::new();
    for e in &elves {
        libs.extend(library_closure(e)?);
    }
    for lib in libs {
        // The file itself, under the name the loader asks for.
        let real = std::fs::canonicalize(&lib).map_err(|source| BuildError::Read {
            path: lib.clone(),
            source,
        })?;
        let dest = lib
            .display()
            .to_string()
            .trim_start_matches('/')
            .to_string();
        add_parents(files, &dest);
        files.insert(dest, cpio::Entry::file(0o755, read(&real)?));
    }
    Ok(())
}

/// Largest initrd accepted.
pub const MAX_SIZE: usize = 16 * 1024 * 1024;

fn read(path: &Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The guest's root filesystem, by path (sorted, so every writer is deterministic): the same
/// tree goes into the initrd and into the disk image.
pub fn rootfs_files(spec: &InitrdSpec) -> Result<BTreeMap<String, cpio::Entry>, BuildError> {
    let mut files: BTreeMap<String, cpio::Entry> = BTreeMap::new();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "etc/kata-agent",
        "lib",
        "bin",
        "sbin",
        "mnt",
        "root",
    ] {
        files.insert(dir.to_string(), cpio::Entry::dir(0o755));
    }
    files.insert("dev/console".into(), cpio::Entry::char_device(0o600, 5, 1));
    files.insert("dev/null".into(), cpio::Entry::char_device(0o666, 1, 3));
    files.insert("init".into(), cpio::Entry::file(0o755, read(&spec.agent)?));
    // The kernel's default init when it mounts a disk root (the image has no initramfs).
    files.insert("sbin/init".into(), cpio::Entry::symlink("/init"));
    // The agent writes the pod's DNS here; /run is a tmpfs, so this works on a read-only root.
    files.insert(
        "etc/resolv.conf".into(),
        cpio::Entry::symlink("/run/resolv.conf"),
    );
    if let Some(modules_dir) = &spec.modules_dir {
        add_modules(&mut files, modules_dir, &spec.modules)?;
    }
    if let Some(bb) = &spec.busybox {
        files.insert("bin/busybox".into(), cpio::Entry::file(0o755, read(bb)?));
        files.insert("bin/sh".into(), cpio::Entry::symlink("busybox"));
    }
    for (src, dest) in &spec.trees {
        add_tree(&mut files, src, dest)?;
    }
    if let Some(multi) = &spec.iptables {
        add_iptables(&mut files, multi)?;
    }
    Ok(files)
}

/// Builds the initrd bytes.
pub fn build_initrd(spec: &InitrdSpec) -> Result<Vec<u8>, BuildError> {
    let files = rootfs_files(spec)?;
    let bytes = cpio::write(files.iter().map(|(p, e)| (p.as_str(), e)));
    if bytes.len() > MAX_SIZE {
        return Err(BuildError::TooLarge {
            size: bytes.len(),
            limit: MAX_SIZE,
        });
    }
    Ok(bytes)
}

/// Copies the tree `src` (directories, regular files with their modes, symlinks) to `dest`.
fn add_tree(
    files: &mut BTreeMap<String, cpio::Entry>,
    src: &Path,
    dest: &str,
) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let dest = dest.trim_matches('/');
    let mut parent = Path::new(dest).parent();
    while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
        files
            .entry(p.display().to_string())
            .or_insert_with(|| cpio::Entry::dir(0o755));
        parent = p.parent();
    }
    let meta = std::fs::symlink_metadata(src).map_err(|source| BuildError::Read {
        path: src.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(|source| BuildError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        files.insert(
            dest.to_string(),
            cpio::Entry::symlink(&target.display().to_string()),
        );
    } else if meta.is_dir() {
        files.insert(dest.to_string(), cpio::Entry::dir(mode));
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(|source| BuildError::Read {
                path: src.to_path_buf(),
                source,
            })?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            add_tree(
                files,
                &src.join(&n),
                &format!("{dest}/{}", n.to_string_lossy()),
            )?;
        }
    } else {
        files.insert(dest.to_string(), cpio::Entry::file(mode, read(src)?));
    }
    Ok(())
}

/// Adds `wanted` and their dependencies under `lib/modules/<release>/`, and their load list.
fn add_modules(
    files: &mut BTreeMap<String, cpio::Entry>,
    modules_dir: &Path,
    wanted: &[String],
) -> Result<(), BuildError> {
    let release = modules_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let dep_text = String::from_utf8_lossy(&read(&modules_dir.join("modules.dep"))?).to_string();
    let deps = modules::parse_modules_dep(&dep_text);
    let order = modules::closure(&deps, wanted)?;
    let mut list = String::new();
    for rel in &order {
        let src = modules_dir.join(rel);
        let dest = format!("lib/modules/{release}/{rel}");
        let mut parent = Path::new(&dest).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            files
                .entry(p.display().to_string())
                .or_insert_with(|| cpio::Entry::dir(0o755));
            parent = p.parent();
        }
        files.insert(dest, cpio::Entry::file(0o644, read(&src)?));
        list.push_str(rel);
        list.push('\n');
    }
    files.insert(
        "etc/kata-agent/modules".into(),
        cpio::Entry::file(0o644, list.into_bytes()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inputs_give_the_same_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let modules = dir.path().join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(modules.join("kernel/fs")).expect("mkdir");
        std::fs::write(modules.join("kernel/fs/a.ko"), b"module a").expect("a");
        std::fs::write(modules.join("kernel/fs/b.ko"), b"module b").expect("b");
        std::fs::write(
            modules.join("modules.dep"),
            "kernel/fs/a.ko: kernel/fs/b.ko\nkernel/fs/b.ko:\n",
        )
        .expect("dep");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent").expect("agent");
        let spec = InitrdSpec {
            agent: agent.clone(),
            modules_dir: Some(modules.clone()),
            modules: vec!["a".into()],
            ..Default::default()
        };
        let one = build_initrd(&spec).expect("build");
        // Touch the inputs: timestamps must not matter.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&agent, b"\x7fELF agent").expect("agent");
        let two = build_initrd(&spec).expect("build again");
        assert_eq!(one, two);
        let text = String::from_utf8_lossy(&one);
        assert!(
            text.contains("lib/modules/6.1.0-test/kernel/fs/b.ko")
                && text.contains("etc/kata-agent/modules")
        );
        // b (the dependency) is listed before a.
        let list_pos = text.find("kernel/fs/b.ko\nkernel/fs/a.ko\n");
        assert!(list_pos.is_some(), "load order");
        let missing = InitrdSpec {
            modules: vec!["nope".into()],
            ..spec
        };
        assert!(matches!(
            build_initrd(&missing),
            Err(BuildError::UnknownModule(_))
        ));
    }

    #[test]
    fn a_built_in_kernel_gets_no_modules_and_no_load_list() {
        let dir = tempfile::tempdir().expect("tmp");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent").expect("agent");
        let spec = InitrdSpec {
            agent,
            modules: DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let bytes = build_initrd(&spec).expect("build");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init"), "the agent is /init");
        assert!(!text.contains(".ko"), "no module files");
        assert!(!text.contains("lib/modules"), "no module tree");
        assert!(!text.contains("etc/kata-agent/modules"), "no load list");
    }

    #[test]
    fn trees_are_copied_with_modes_and_symlinks() {
        let dir = tempfile::tempdir().expect("tmp");
        let hooks = dir.path().join("hooks");
        std::fs::create_dir_all(hooks.join("prestart")).expect("mkdir");
        std::fs::write(hooks.join("prestart/10-a"), b"#!/bin/sh\n").expect("hook");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            hooks.join("prestart/10-a"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("10-a", hooks.join("prestart/20-b")).expect("symlink");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent").expect("agent");
        let spec = InitrdSpec {
            agent,
            trees: vec![(hooks, "/usr/share/oci/hooks".into())],
            ..Default::default()
        };
        let bytes = build_initrd(&spec).expect("build");
        let text = String::from_utf8_lossy(&bytes);
        for path in [
            "usr/share/oci/hooks/prestart/10-a",
            "usr/share/oci/hooks/prestart/20-b",
            "usr/share/oci",
        ] {
            assert!(text.contains(path), "{path}");
        }
        // newc headers: mode 0100755 for the hook, 0120777 for the symlink.
        assert!(
            text.to_ascii_uppercase().contains("000081ED")
                && text.to_ascii_uppercase().contains("0000A1FF")
        );
        assert_eq!(bytes, build_initrd(&spec).expect("again"), "deterministic");
    }

    #[test]
    fn iptables_comes_with_its_libraries_and_extensions() {
        let multi = Path::new("/usr/sbin/xtables-legacy-multi");
        if !multi.exists() {
            eprintln!("skipped: no iptables on this host (scripts/install-deps.sh installs it)");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent").expect("agent");
        let spec = InitrdSpec {
            agent,
            iptables: Some(multi.to_path_buf()),
            ..Default::default()
        };
        let bytes = build_initrd(&spec).expect("build");
        let text = String::from_utf8_lossy(&bytes);
        for path in [
            "sbin/xtables-legacy-multi",
            "sbin/iptables-restore",
            "sbin/ip6tables-save",
            "lib64/ld-linux-x86-64.so.2",
            "libxtables.so",
            "libc.so.6",
            "usr/lib/x86_64-linux-gnu/xtables/libxt_tcp.so",
        ] {
            assert!(text.contains(path), "{path}");
        }
    }
}
