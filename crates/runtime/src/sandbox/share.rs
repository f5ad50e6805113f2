//! What the sandbox shares with its guest: root filesystems and bind mounts, bound into the share
//! (resolved inside it with `kata-mount`), and removed again.

use super::*;

impl Sandbox {
    /// Shares a host root filesystem directory with the guest; returns its guest path.
    pub fn share_rootfs(
        &self,
        container_id: &str,
        host_rootfs: &Path,
    ) -> Result<PathBuf, SandboxError> {
        crate::ids::check("container", container_id)?;
        let rel = Path::new(container_id).join("rootfs");
        self.bind_into_share(&rel, host_rootfs, &["rbind".to_string()])?;
        Ok(Path::new(GUEST_SHARED_DIR).join(rel))
    }

    /// Bind-mounts `source` at `rel` inside `mounts/` (made below descriptors, never through a
    /// symlink) with OCI `options` (`ro` read-only at its top, `rro` everywhere, before it is
    /// attached; an option a bind cannot honour is an error).
    fn bind_into_share(
        &self,
        rel: &Path,
        source: &Path,
        options: &[String],
    ) -> Result<(), SandboxError> {
        let mounts = self.paths.mounts_dir();
        let fail = |e: kata_mount::MountError| SandboxError::Share {
            source_path: source.display().to_string(),
            target: mounts.join(rel).display().to_string(),
            source: e,
        };
        let mut opts = kata_mount::parse(options, true).map_err(fail)?;
        // Propagation is the container's business (applied in the guest); here the bind must
        // propagate to the export and virtiofsd.
        opts.propagation = MsFlags::empty();
        let kind = if source.is_dir() {
            kata_mount::Kind::Dir
        } else {
            kata_mount::Kind::File
        };
        let root = kata_mount::open_dir(&mounts).map_err(|e| {
            fail(kata_mount::MountError::io(
                format!("open {}", mounts.display()),
                e,
            ))
        })?;
        use std::os::fd::AsFd;
        let target = kata_mount::create_in_root(root.as_fd(), rel, kind).map_err(fail)?;
        kata_mount::bind(source, target.as_fd(), &opts).map_err(fail)
    }

    /// Removes what [`Sandbox::share_rootfs`] and [`Sandbox::share_mount`] set up.
    pub fn unshare(&self, container_id: &str) {
        if !crate::ids::is_valid(container_id) {
            return;
        }
        self.unwatch(container_id);
        let dir = self.paths.mounts_dir().join(container_id);
        unmount_under(&dir);
        unmount_under(&self.paths.export_dir().join(container_id));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Shares a host file or directory (a bind mount of the spec) with the guest with the
    /// mount's OCI options (`ro`, `rro`... are honoured on the host side too, so the guest cannot
    /// write through the share); returns its guest path.
    pub fn share_mount(
        &self,
        container_id: &str,
        index: usize,
        source: &Path,
        options: &[String],
    ) -> Result<PathBuf, SandboxError> {
        crate::ids::check("container", container_id)?;
        let rel = Path::new(container_id)
            .join("mounts")
            .join(index.to_string());
        self.bind_into_share(&rel, source, options)?;
        Ok(Path::new(GUEST_SHARED_DIR).join(rel))
    }
}
