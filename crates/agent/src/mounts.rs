//! Mount option parsing (pure) and the mount calls the agent and the container helper share.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Splits OCI/fstab-style options into mount flags, propagation flags and filesystem data.
pub fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let p = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                propagation |= p;
                if o.starts_with('r') {
                    propagation |= MsFlags::MS_REC;
                }
                continue;
            }
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags, propagation, data.join(","))
}

/// Mounts one filesystem, creating the mount point (a file for a file bind mount).
pub fn mount_one(
    source: &str,
    dest: &Path,
    fstype: &str,
    options: &[String],
) -> Result<(), String> {
    let (flags, propagation, data) = parse_options(options);
    let bind = flags.contains(MsFlags::MS_BIND) || fstype == "bind";
    if bind && Path::new(source).is_file() {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        if !dest.exists() {
            std::fs::File::create(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        }
    } else {
        std::fs::create_dir_all(dest).map_err(|e| format!("mkdir {}: {e}", dest.display()))?;
    }
    let data_opt = (!data.is_empty()).then_some(data.as_str());
    if bind {
        let first = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(Some(source), dest, None::<&str>, first, None::<&str>)
            .map_err(|e| format!("bind mount {source} on {}: {e}", dest.display()))?;
        let rest = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !rest.is_empty() {
            mount(
                None::<&str>,
                dest,
                None::<&str>,
                rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(|e| format!("remount {} ({options:?}): {e}", dest.display()))?;
        }
    } else {
        let fstype = if fstype == "cgroup" {
            "cgroup2"
        } else {
            fstype
        };
        let source = if source.is_empty() { fstype } else { source };
        // The kernel refuses the v1 controller list ("cgroup2" takes none).
        let data_opt = if fstype == "cgroup2" { None } else { data_opt };
        mount(Some(source), dest, Some(fstype), flags, data_opt)
            .map_err(|e| format!("mount {fstype} {source} on {}: {e}", dest.display()))?;
    }
    if !propagation.is_empty() {
        mount(None::<&str>, dest, None::<&str>, propagation, None::<&str>)
            .map_err(|e| format!("set propagation of {}: {e}", dest.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn splits_flags_propagation_and_data() {
        let (f, p, d) = parse_options(&opts(&[
            "nosuid",
            "noexec",
            "nodev",
            "mode=755",
            "size=65536k",
        ]));
        assert_eq!(
            f,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
        );
        assert!(p.is_empty());
        assert_eq!(d, "mode=755,size=65536k");
        let (f, p, d) = parse_options(&opts(&["rbind", "ro", "rprivate"]));
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY);
        assert_eq!(p, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert!(d.is_empty());
        let (f, _, _) = parse_options(&opts(&["ro", "rw"]));
        assert!(!f.contains(MsFlags::MS_RDONLY), "later options win");
    }
}
