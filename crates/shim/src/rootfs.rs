//! The snapshotter's mounts for a task's root filesystem, and containerd's runtime options.

use std::path::{Path, PathBuf};

use crate::error::{step, ShimError};
use containerd_shim_protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mounts the snapshotter's mounts (usually one overlay) on `target`.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), ShimError> {
    std::fs::create_dir_all(target).map_err(step(format!("create {}", target.display())))?;
    for m in mounts {
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                other => data.push(other.to_string()),
            }
        }
        let fstype = if m.type_ == "bind" {
            None
        } else {
            Some(m.type_.as_str())
        };
        if m.type_ == "bind" {
            flags |= MsFlags::MS_BIND;
        }
        let data = data.join(",");
        mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(step(format!(
            "mount {} {} on {}",
            m.type_,
            m.source,
            target.display()
        )))?;
    }
    Ok(())
}

/// Unmounts everything on `target` (idempotent).
pub fn unmount_rootfs(target: &Path) {
    for _ in 0..8 {
        if umount2(target, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// `ConfigPath` from containerd's runtime options (`runtimeoptions.v1.Options`, field 2).
pub fn config_path(options: Option<&protobuf::well_known_types::any::Any>) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    string_field(&any.value, 2)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// The length-delimited fields of protobuf bytes, in order, as (number, bytes); other wire
/// types are skipped. `None` for malformed input.
pub fn len_fields(mut b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let (value, rest) = (b.get(..len)?, b.get(len..)?);
                out.push((key >> 3, value));
                b = rest;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Reads string field `number` from protobuf bytes (other fields skipped).
pub fn string_field(b: &[u8], number: u64) -> Option<String> {
    len_fields(b)?
        .into_iter()
        .find(|(n, _)| *n == number)
        .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_config_path() {
        // field 1 = "t", field 2 = "/etc/kata.toml"
        let mut v = vec![0x0a, 1, b't', 0x12, 14];
        v.extend_from_slice(b"/etc/kata.toml");
        let any = protobuf::well_known_types::any::Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: v.clone(),
            ..Default::default()
        };
        assert_eq!(
            config_path(Some(&any)),
            Some(PathBuf::from("/etc/kata.toml"))
        );
        let other = protobuf::well_known_types::any::Any {
            type_url: "x.Other".into(),
            value: v,
            ..Default::default()
        };
        assert_eq!(config_path(Some(&other)), None);
        assert_eq!(string_field(&[0x12, 200], 2), None, "truncated input");
        assert_eq!(
            string_field(&[0x08, 0x96, 0x01, 0x12, 1, b'a'], 2).as_deref(),
            Some("a")
        );
        assert_eq!(string_field(&[0xff], 2), None);
    }
}
