//! Direct volumes (Kata's `kata-runtime direct-volume`): a CSI driver or an admin tells the
//! runtime that the volume mounted at a host path is really a block device, by writing
//! `/run/kata-containers/shared/direct-volumes/<base64url(path)>/mountInfo.json`. At container
//! create a bind mount whose source has such a file becomes that device, hot-plugged and
//! mounted in the guest; an empty file named after the sandbox records who uses it.
//!
//! The file's keys are Kata's: `volume-type`, `device`, `fstype`, `metadata`, `options`; as
//! Kata's Go runtime reads them, keys match case-insensitively (its docs write `Device`) and
//! `volume_type` (Kata's older docs) is accepted. Other keys are reported, not fatal.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Serialize;

/// Where direct volumes are recorded.
pub const DIRECT_VOLUMES_ROOT: &str = "/run/kata-containers/shared/direct-volumes";
/// The file describing a volume.
pub const MOUNT_INFO: &str = "mountInfo.json";
/// The largest mountInfo.json read.
const MAX_MOUNT_INFO: u64 = 1 << 20;

/// A direct volume's description.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MountInfo {
    /// Kata's volume type (informational here, as in Kata's Go runtime).
    #[serde(rename = "volume-type")]
    pub volume_type: String,
    /// The host block device or disk image.
    pub device: String,
    /// Its filesystem.
    pub fstype: String,
    /// Free-form metadata (`fsGroup`, `fsGroupChangePolicy`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Mount options (`ro` makes the volume read-only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl MountInfo {
    /// Whether the volume is mounted read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// What went wrong, naming the volume or the key.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume path is not recorded.
    #[error("volume {0} is not a direct volume (no {MOUNT_INFO} for it under {DIRECT_VOLUMES_ROOT}; add it with 'kata-runtime direct-volume add')")]
    Unknown(String),
    /// The volume path is not absolute.
    #[error("volume path {0:?} must be an absolute path")]
    NotAbsolute(String),
    /// mountInfo.json cannot be used.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file (or "mount info" for input).
        path: String,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// No sandbox uses the volume.
    #[error(
        "volume {0} is not used by any sandbox yet (it is recorded when a container mounts it)"
    )]
    NoSandbox(String),
    /// I/O.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Parses mountInfo.json text. Returns the description and the keys it ignored.
pub fn parse(text: &[u8], path: &str) -> Result<(MountInfo, Vec<String>), VolumeError> {
    let bad = |reason: String| VolumeError::Malformed {
        path: path.to_string(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(bad(
            "expected a JSON object with \"device\" and \"fstype\"".into()
        ));
    };
    let mut info = MountInfo::default();
    let mut ignored = Vec::new();
    let string = |key: &str, v: &serde_json::Value| -> Result<String, VolumeError> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("key {key:?} must be a string, got {v}")))
    };
    for (key, value) in obj {
        match key.to_ascii_lowercase().as_str() {
            "volume-type" | "volume_type" => info.volume_type = string(key, value)?,
            "device" => info.device = string(key, value)?,
            "fstype" => info.fstype = string(key, value)?,
            "metadata" => {
                if value.is_null() {
                    continue;
                }
                let Some(m) = value.as_object() else {
                    return Err(bad(format!(
                        "key {key:?} must be an object of strings, got {value}"
                    )));
                };
                for (k, v) in m {
                    let s = v.as_str().ok_or_else(|| {
                        bad(format!("key \"metadata.{k}\" must be a string, got {v}"))
                    })?;
                    info.metadata.insert(k.clone(), s.to_string());
                }
            }
            "options" => {
                if value.is_null() {
                    continue;
                }
                let Some(a) = value.as_array() else {
                    return Err(bad(format!(
                        "key {key:?} must be an array of strings, got {value}"
                    )));
                };
                for o in a {
                    info.options.push(
                        o.as_str()
                            .ok_or_else(|| {
                                bad(format!("key \"options\" must hold strings, got {o}"))
                            })?
                            .to_string(),
                    );
                }
            }
            _ => ignored.push(key.clone()),
        }
    }
    if info.device.is_empty() {
        return Err(bad(
            "key \"device\" is missing or empty (the host block device or disk image)".into(),
        ));
    }
    if !info.device.starts_with('/') {
        return Err(bad(format!(
            "key \"device\" must be an absolute path, got {:?}",
            info.device
        )));
    }
    if info.fstype.is_empty() {
        return Err(bad(
            "key \"fstype\" is missing or empty (for example \"ext4\" or \"xfs\")".into(),
        ));
    }
    Ok((info, ignored))
}

/// The directory name for a volume path: base64url, padded (Kata's).
pub fn encode(volume_path: &str) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(volume_path.as_bytes())
}

/// The store of direct volumes under a root (normally [`DIRECT_VOLUMES_ROOT`]).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(DIRECT_VOLUMES_ROOT)
    }
}

impl Store {
    /// A store under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    fn dir(&self, volume_path: &str) -> Result<PathBuf, VolumeError> {
        if !volume_path.starts_with('/') {
            return Err(VolumeError::NotAbsolute(volume_path.to_string()));
        }
        Ok(self.root.join(encode(volume_path)))
    }

    /// Records a volume (`kata-runtime direct-volume add`): validates the description and
    /// writes it as given. Returns the keys it ignored.
    pub fn add(&self, volume_path: &str, json: &[u8]) -> Result<Vec<String>, VolumeError> {
        let (_, ignored) = parse(json, "mount info")?;
        let dir = self.dir(volume_path)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?;
        let file = dir.join(MOUNT_INFO);
        let tmp = dir.join(".mountInfo.json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("write", &tmp))?;
        f.write_all(json).map_err(io("write", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &file).map_err(io("write", &file))?;
        Ok(ignored)
    }

    /// Forgets a volume (`kata-runtime direct-volume remove`).
    pub fn remove(&self, volume_path: &str) -> Result<(), VolumeError> {
        let dir = self.dir(volume_path)?;
        if !dir.join(MOUNT_INFO).exists() {
            return Err(VolumeError::Unknown(volume_path.to_string()));
        }
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))
    }

    /// The description of the volume at `volume_path`, if it is a direct volume.
    pub fn get(&self, volume_path: &str) -> Result<Option<MountInfo>, VolumeError> {
        let dir = self.dir(volume_path)?;
        let file = dir.join(MOUNT_INFO);
        let text = match std::fs::File::open(&file) {
            Ok(f) => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_MOUNT_INFO), &mut buf)
                    .map_err(io("read", &file))?;
                buf
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &file)(e)),
        };
        let (info, ignored) = parse(&text, &file.display().to_string())?;
        if !ignored.is_empty() {
            tracing::warn!(file = %file.display(), ?ignored, "direct volume: keys ignored");
        }
        Ok(Some(info))
    }

    /// Like [`Store::get`], but an unknown volume is an error.
    pub fn require(&self, volume_path: &str) -> Result<MountInfo, VolumeError> {
        self.get(volume_path)?
            .ok_or_else(|| VolumeError::Unknown(volume_path.to_string()))
    }

    /// Records that `sandbox_id` uses the volume (an empty file named after it).
    pub fn record_sandbox(&self, volume_path: &str, sandbox_id: &str) -> Result<(), VolumeError> {
        let dir = self.dir(volume_path)?;
        let f = dir.join(sandbox_id);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&f)
            .map(|_| ())
            .map_err(io("write", &f))
    }

    /// Removes the record that `sandbox_id` uses the volume (when it unplugs it).
    pub fn forget_sandbox(&self, volume_path: &str, sandbox_id: &str) {
        if let Ok(dir) = self.dir(volume_path) {
            if crate::ids::is_valid(sandbox_id) {
                let _ = std::fs::remove_file(dir.join(sandbox_id));
            }
        }
    }

    /// The sandboxes recorded as using the volume, sorted.
    pub fn sandboxes_of(&self, volume_path: &str) -> Result<Vec<String>, VolumeError> {
        let dir = self.dir(volume_path)?;
        if !dir.join(MOUNT_INFO).exists() {
            return Err(VolumeError::Unknown(volume_path.to_string()));
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io("read", &dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != MOUNT_INFO && !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The sandbox using the volume: the first entry that is not mountInfo.json (Kata's rule).
    pub fn sandbox_of(&self, volume_path: &str) -> Result<String, VolumeError> {
        self.sandboxes_of(volume_path)?
            .into_iter()
            .next()
            .ok_or_else(|| VolumeError::NoSandbox(volume_path.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn katas_keys_as_go_and_kata_ctl_write_them() {
        let go = br#"{"volume-type":"block","Device":"/dev/loop3","FsType":"ext4","metadata":{"fsGroup":"1000"},"options":["ro"]}"#;
        let (info, ignored) = parse(go, "x").expect("go");
        assert!(ignored.is_empty());
        assert_eq!(info.device, "/dev/loop3");
        assert_eq!(info.fstype, "ext4");
        assert!(info.read_only());
        assert_eq!(
            info.metadata.get("fsGroup").map(String::as_str),
            Some("1000")
        );
        let ctl = br#"{"volume-type":"directvol","device":"/dev/sdb","fstype":"xfs","metadata":null,"options":null,"extra":1}"#;
        let (info, ignored) = parse(ctl, "x").expect("kata-ctl");
        assert_eq!(info.volume_type, "directvol");
        assert_eq!(ignored, ["extra"]);
        let old_docs = br#"{"volume_type":"block","device":"/dev/sdb","fstype":"xfs"}"#;
        assert_eq!(
            parse(old_docs, "x").expect("old docs").0.volume_type,
            "block"
        );
        // Serialized with Kata's names.
        let out = serde_json::to_string(&info).expect("json");
        assert_eq!(
            out,
            r#"{"volume-type":"directvol","device":"/dev/sdb","fstype":"xfs"}"#
        );
    }

    #[test]
    fn malformed_files_name_the_key() {
        for (text, key) in [
            (&br#"{"device":"/dev/sdb"}"#[..], "\"fstype\""),
            (br#"{"fstype":"ext4"}"#, "\"device\""),
            (br#"{"device":"sdb","fstype":"ext4"}"#, "\"device\""),
            (br#"{"device":7,"fstype":"ext4"}"#, "\"device\""),
            (
                br#"{"device":"/dev/sdb","fstype":"ext4","options":"ro"}"#,
                "\"options\"",
            ),
            (
                br#"{"device":"/dev/sdb","fstype":"ext4","metadata":{"a":1}}"#,
                "metadata.a",
            ),
            (br#"[1]"#, "JSON object"),
            (b"{", "not JSON"),
        ] {
            let e = parse(text, "f").expect_err("bad").to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }

    #[test]
    fn layout_is_katas() {
        let d = tempfile::tempdir().expect("tmp");
        let store = Store::new(d.path());
        let vol = "/var/lib/kubelet/pods/p/volumes/v";
        store
            .add(vol, br#"{"device":"/dev/loop3","fstype":"ext4"}"#)
            .expect("add");
        let dir = d.path().join(encode(vol));
        assert_eq!(
            dir.file_name().and_then(|n| n.to_str()),
            Some("L3Zhci9saWIva3ViZWxldC9wb2RzL3Avdm9sdW1lcy92")
        );
        assert!(dir.join(MOUNT_INFO).is_file());
        assert!(matches!(
            store.sandbox_of(vol),
            Err(VolumeError::NoSandbox(_))
        ));
        store.record_sandbox(vol, "sb1").expect("record");
        assert_eq!(store.sandbox_of(vol).expect("sandbox"), "sb1");
        assert_eq!(store.require(vol).expect("get").device, "/dev/loop3");
        store.remove(vol).expect("remove");
        assert!(!dir.exists());
        assert!(matches!(store.remove(vol), Err(VolumeError::Unknown(_))));
        assert!(matches!(
            store.get("relative"),
            Err(VolumeError::NotAbsolute(_))
        ));
        assert_eq!(store.get("/not/a/volume").expect("none"), None);
    }

    #[test]
    fn padded_base64url() {
        assert_eq!(encode("/a"), "L2E=");
        assert_eq!(encode("/dev/x?y>"), "L2Rldi94P3k-");
    }
}
