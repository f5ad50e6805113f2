//! Mount options as runc reads them (OCI `mounts[].options`, fstab style).
//!
//! Every option is one of: a mount flag (`ro`, `nosuid`, ...), a propagation (`rprivate`, ...), a
//! recursive mount attribute (`rro`, `rnosuid`, ... as runc 1.1 and the OCI spec define them,
//! applied to every submount with `mount_setattr(AT_RECURSIVE)`), or filesystem data (`size=`,
//! `mode=`...). A bind mount has no filesystem data, so an option a bind mount cannot honour is an
//! error naming it, never silently dropped (a dropped `rro` once made a read-only volume
//! writable).

use crate::error::MountError;
use nix::mount::MsFlags;

/// `MOUNT_ATTR_RDONLY`.
pub const ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub const ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub const ATTR_NODEV: u64 = 0x4;
/// `MOUNT_ATTR_NOEXEC`.
pub const ATTR_NOEXEC: u64 = 0x8;
/// `MOUNT_ATTR__ATIME` (the mask of the three atime modes).
pub const ATTR_ATIME_MASK: u64 = 0x70;
/// `MOUNT_ATTR_RELATIME`.
pub const ATTR_RELATIME: u64 = 0x0;
/// `MOUNT_ATTR_NOATIME`.
pub const ATTR_NOATIME: u64 = 0x10;
/// `MOUNT_ATTR_STRICTATIME`.
pub const ATTR_STRICTATIME: u64 = 0x20;
/// `MOUNT_ATTR_NODIRATIME`.
pub const ATTR_NODIRATIME: u64 = 0x80;
/// `MOUNT_ATTR_NOSYMFOLLOW`.
pub const ATTR_NOSYMFOLLOW: u64 = 0x0020_0000;

/// Mount attributes to set and clear (`struct mount_attr`'s first two fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    /// `attr_set`.
    pub set: u64,
    /// `attr_clr`.
    pub clr: u64,
}

impl Attr {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.clr == 0
    }

    fn apply(&mut self, set: u64, clr: u64) {
        self.set = (self.set & !clr) | set;
        self.clr = (self.clr & !set) | clr;
    }

    /// Whether the mount ends up read-only.
    pub fn read_only(&self) -> bool {
        self.set & ATTR_RDONLY != 0
    }
}

/// Parsed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// `bind` or `rbind`.
    pub bind: bool,
    /// `rbind` (submounts come along).
    pub recursive: bool,
    /// Flags for `mount(2)` (a new filesystem's mount).
    pub flags: MsFlags,
    /// Attributes of the mount itself (for a bind: its top only, as runc remounts).
    pub top: Attr,
    /// Attributes of the mount and every submount (`rro`, `rnosuid`...).
    pub all: Attr,
    /// Propagation (`MS_SHARED`... and `MS_REC` for the `r` forms).
    pub propagation: MsFlags,
    /// Filesystem data (`size=64m`...).
    pub data: Vec<String>,
}

impl MountOptions {
    /// Whether the mount (its top) is read-only.
    pub fn read_only(&self) -> bool {
        self.top.read_only() || self.all.read_only()
    }

    /// The filesystem data joined with commas (`None` when empty).
    pub fn data(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// (flag, attribute set, attribute clear) of a per-mount option; `None` for others.
fn mount_flag(o: &str) -> Option<(MsFlags, bool, u64, u64)> {
    // (flag to set or clear, set?, attr set, attr clear)
    Some(match o {
        "ro" => (MsFlags::MS_RDONLY, true, ATTR_RDONLY, 0),
        "rw" => (MsFlags::MS_RDONLY, false, 0, ATTR_RDONLY),
        "nosuid" => (MsFlags::MS_NOSUID, true, ATTR_NOSUID, 0),
        "suid" => (MsFlags::MS_NOSUID, false, 0, ATTR_NOSUID),
        "nodev" => (MsFlags::MS_NODEV, true, ATTR_NODEV, 0),
        "dev" => (MsFlags::MS_NODEV, false, 0, ATTR_NODEV),
        "noexec" => (MsFlags::MS_NOEXEC, true, ATTR_NOEXEC, 0),
        "exec" => (MsFlags::MS_NOEXEC, false, 0, ATTR_NOEXEC),
        "noatime" => (MsFlags::MS_NOATIME, true, ATTR_NOATIME, ATTR_ATIME_MASK),
        "atime" => (MsFlags::MS_NOATIME, false, ATTR_RELATIME, ATTR_ATIME_MASK),
        "relatime" => (MsFlags::MS_RELATIME, true, ATTR_RELATIME, ATTR_ATIME_MASK),
        "norelatime" => (MsFlags::MS_RELATIME, false, ATTR_RELATIME, ATTR_ATIME_MASK),
        "strictatime" => (
            MsFlags::MS_STRICTATIME,
            true,
            ATTR_STRICTATIME,
            ATTR_ATIME_MASK,
        ),
        "nostrictatime" => (
            MsFlags::MS_STRICTATIME,
            false,
            ATTR_RELATIME,
            ATTR_ATIME_MASK,
        ),
        "nodiratime" => (MsFlags::MS_NODIRATIME, true, ATTR_NODIRATIME, 0),
        "diratime" => (MsFlags::MS_NODIRATIME, false, 0, ATTR_NODIRATIME),
        "nosymfollow" => (MsFlags::from_bits_retain(0x100), true, ATTR_NOSYMFOLLOW, 0),
        "symfollow" => (MsFlags::from_bits_retain(0x100), false, 0, ATTR_NOSYMFOLLOW),
        _ => return None,
    })
}

/// Superblock flags: fine on a new filesystem, meaningless on a bind mount.
fn superblock_flag(o: &str) -> Option<(MsFlags, bool)> {
    Some(match o {
        "sync" => (MsFlags::MS_SYNCHRONOUS, true),
        "async" => (MsFlags::MS_SYNCHRONOUS, false),
        "dirsync" => (MsFlags::MS_DIRSYNC, true),
        "mand" => (MsFlags::MS_MANDLOCK, true),
        "nomand" => (MsFlags::MS_MANDLOCK, false),
        "lazytime" => (MsFlags::from_bits_retain(1 << 25), true),
        "nolazytime" => (MsFlags::from_bits_retain(1 << 25), false),
        "iversion" => (MsFlags::MS_I_VERSION, true),
        "noiversion" => (MsFlags::MS_I_VERSION, false),
        "silent" => (MsFlags::MS_SILENT, true),
        "loud" => (MsFlags::MS_SILENT, false),
        "acl" => (MsFlags::MS_POSIXACL, true),
        "noacl" => (MsFlags::MS_POSIXACL, false),
        "remount" => (MsFlags::MS_REMOUNT, true),
        _ => return None,
    })
}

fn propagation(o: &str) -> Option<MsFlags> {
    let kind = |k: &str| match k {
        "private" => Some(MsFlags::MS_PRIVATE),
        "shared" => Some(MsFlags::MS_SHARED),
        "slave" => Some(MsFlags::MS_SLAVE),
        "unbindable" => Some(MsFlags::MS_UNBINDABLE),
        _ => None,
    };
    kind(o).or_else(|| {
        o.strip_prefix('r')
            .and_then(kind)
            .map(|p| p | MsFlags::MS_REC)
    })
}

/// Parses `options` of a mount; `bind`: the mount's type is `bind` (a bind mount also when
/// the options say `bind`/`rbind`).
pub fn parse(options: &[String], bind_type: bool) -> Result<MountOptions, MountError> {
    let mut m = MountOptions {
        bind: bind_type,
        recursive: false,
        flags: MsFlags::empty(),
        top: Attr::default(),
        all: Attr::default(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
    };
    // First pass: is it a bind mount?
    for o in options {
        match o.as_str() {
            "bind" => m.bind = true,
            "rbind" => {
                m.bind = true;
                m.recursive = true;
            }
            _ => {}
        }
    }
    for o in options {
        let o = o.as_str();
        if matches!(o, "bind" | "rbind" | "defaults" | "") {
            continue;
        }
        if let Some((flag, set, aset, aclr)) = mount_flag(o) {
            if set {
                m.flags |= flag;
            } else {
                m.flags &= !flag;
            }
            m.top.apply(aset, aclr);
            continue;
        }
        if let Some(p) = propagation(o) {
            m.propagation = p;
            continue;
        }
        if let Some(r) = o.strip_prefix('r').and_then(mount_flag) {
            let (_, _, aset, aclr) = r;
            m.all.apply(aset, aclr);
            continue;
        }
        if let Some((flag, set)) = superblock_flag(o) {
            if m.bind {
                return Err(MountError::Option {
                    option: o.to_string(),
                    why: "applies to a filesystem, not to a bind mount; remove it",
                });
            }
            if set {
                m.flags |= flag;
            } else {
                m.flags &= !flag;
            }
            continue;
        }
        if matches!(o, "idmap" | "ridmap" | "tmpcopyup") {
            return Err(MountError::Option {
                option: o.to_string(),
                why: "is not supported by this runtime; remove it",
            });
        }
        if m.bind {
            return Err(MountError::Option {
                option: o.to_string(),
                why: "is not understood for a bind mount (known: ro, rw, rro, nosuid, nodev, \
                      noexec, the atime options, their r-forms, and propagation)",
            });
        }
        m.data.push(o.to_string());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_filesystem_gets_flags_and_data() {
        let m = parse(
            &opts(&["nosuid", "noexec", "nodev", "mode=755", "size=65536k"]),
            false,
        )
        .expect("parses");
        assert!(!m.bind);
        assert_eq!(
            m.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
        );
        assert_eq!(m.data().as_deref(), Some("mode=755,size=65536k"));
        assert!(m.propagation.is_empty());
        let m = parse(&opts(&["ro", "rw", "sync"]), false).expect("parses");
        assert_eq!(m.flags, MsFlags::MS_SYNCHRONOUS, "later options win");
    }

    #[test]
    fn ro_is_the_top_and_rro_every_submount() {
        let m = parse(&opts(&["rbind", "ro", "rprivate"]), false).expect("parses");
        assert!(m.bind && m.recursive && m.read_only());
        assert_eq!(m.top.set, ATTR_RDONLY);
        assert!(m.all.is_empty(), "ro is not recursive (runc)");
        assert_eq!(m.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        let m = parse(&opts(&["rbind", "rro"]), true).expect("parses");
        assert_eq!(m.all.set, ATTR_RDONLY);
        assert!(m.read_only());
        let m = parse(&opts(&["rbind", "rro", "rrw"]), true).expect("parses");
        assert_eq!((m.all.set, m.all.clr), (0, ATTR_RDONLY));
        let m = parse(&opts(&["bind", "rnoatime", "rnosuid"]), true).expect("parses");
        assert_eq!(m.all.set, ATTR_NOATIME | ATTR_NOSUID);
        assert_eq!(m.all.clr, ATTR_ATIME_MASK);
    }

    #[test]
    fn a_bind_mount_refuses_what_it_cannot_honour() {
        for bad in ["size=1m", "sync", "rfoo", "idmap", "x-foo"] {
            let e = parse(&opts(&["rbind", bad]), true).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
        // The same options are filesystem data for a tmpfs.
        assert!(parse(&opts(&["size=1m", "x-foo"]), false).is_ok());
        assert!(parse(&opts(&["idmap"]), false).is_err());
    }

    #[test]
    fn the_options_containerd_and_cri_write_are_all_known() {
        for set in [
            &["rbind", "rprivate", "rw"][..],
            &["rbind", "rprivate", "ro"],
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
            &["bind", "rslave", "rro"],
            &["rbind", "rshared"],
            &["rbind", "runbindable", "relatime", "nosymfollow"],
        ] {
            parse(&opts(set), true).unwrap_or_else(|e| panic!("{set:?}: {e}"));
        }
    }

    proptest! {
        /// Any option list parses or is refused, never a panic; a bind mount never carries
        /// filesystem data (the kernel would ignore it).
        #[test]
        fn arbitrary_option_lists(
            options in prop::collection::vec(
                prop_oneof![
                    prop::sample::select(vec![
                        "ro", "rw", "rro", "rrw", "rbind", "bind", "rprivate", "shared",
                        "nosuid", "rnoexec", "noatime", "rstrictatime", "sync", "remount",
                        "size=1m", "mode=755", "idmap", "rfoo", "",
                    ]).prop_map(str::to_string),
                    "[a-z=0-9,]{0,12}",
                ],
                0..8,
            ),
            bind in any::<bool>(),
        ) {
            if let Ok(m) = parse(&options, bind) {
                if m.bind {
                    prop_assert!(m.data.is_empty(), "{:?}", options);
                }
                prop_assert_eq!(m.top.set & m.top.clr & !ATTR_ATIME_MASK, 0);
            }
        }
    }
}
