//! Direct volumes in a running sandbox: a bind mount whose source is a recorded direct volume
//! ([`crate::direct_volume`]) becomes its block device, hot-plugged into the VM once and
//! mounted by the agent at `/run/kata-containers/sandbox/storage/<base64url(source)>`, shared
//! by the sandbox's containers that mount it, unplugged when the last one is removed; its
//! statistics and online growth go through the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use kata_hypervisor::qemu::block::BlockDevice;
use kata_protocols::agent::{
    ResizeVolumeRequest, Storage, VolumeStatsRequest, VolumeStatsResponse,
};

use crate::agent::{agent_err, ctx, CALL_TIMEOUT};

/// How long the guest may take to grow a direct volume's filesystem online: under TCG a large
/// ext4 or xfs takes tens of seconds.
pub const RESIZE_VOLUME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
use super::Sandbox;
use crate::direct_volume::{encode, MountInfo, Store};
use crate::error::SandboxError;

/// Where the agent mounts direct volumes in the guest (Kata's).
pub const GUEST_STORAGE_DIR: &str = "/run/kata-containers/sandbox/storage";

static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// One hot-plugged volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// The QMP id of its block device.
    pub block_id: String,
    /// The host device.
    pub device: String,
    /// The agent's storage for it.
    pub storage: Storage,
    /// Containers using it.
    pub users: BTreeSet<String>,
}

/// The sandbox's hot-plugged volumes, by volume path.
pub type Attached = BTreeMap<String, Volume>;

/// Statistics of a volume, in Kata's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeStats {
    /// Bytes, then inodes.
    pub usage: Vec<VolumeUsage>,
    /// Always healthy when statfs answered.
    pub volume_condition: VolumeCondition,
}

/// One unit's usage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeUsage {
    /// Available.
    pub available: u64,
    /// Total.
    pub total: u64,
    /// Used.
    pub used: u64,
    /// 1 = bytes, 2 = inodes (Kata's enum numbers).
    pub unit: i32,
}

/// The volume's condition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeCondition {
    /// Whether something is wrong.
    pub abnormal: bool,
    /// What.
    pub message: String,
}

impl From<VolumeStatsResponse> for VolumeStats {
    fn from(r: VolumeStatsResponse) -> Self {
        VolumeStats {
            usage: r
                .usage
                .iter()
                .map(|u| VolumeUsage {
                    available: u.available,
                    total: u.total,
                    used: u.used,
                    unit: protobuf::Enum::value(&u.unit.enum_value_or_default()),
                })
                .collect(),
            volume_condition: VolumeCondition {
                abnormal: r.volume_condition.abnormal,
                message: r.volume_condition.message.clone(),
            },
        }
    }
}

fn invalid(volume: &str, what: String) -> SandboxError {
    SandboxError::Invalid(format!("direct volume {volume}: {what}"))
}

impl Sandbox {
    /// Gives container `cid` the direct volume at `volume_path` (described by `info`): the
    /// first user hot-plugs it. Returns the agent's storage (to send with the container) and
    /// the guest path to bind into the container.
    pub async fn attach_volume(
        &self,
        cid: &str,
        volume_path: &str,
        info: &MountInfo,
        mount_options: &[String],
    ) -> Result<(Storage, PathBuf), SandboxError> {
        crate::ids::check("container", cid)?;
        if self.config.hypervisor.disable_block_device_use {
            return Err(invalid(
                volume_path,
                "[hypervisor.qemu].disable_block_device_use = true forbids giving the guest block devices; set it to false or remove the volume's record ('kata-runtime direct-volume remove')".into(),
            ));
        }
        let mut table = self.volumes.lock().await;
        if let Some(v) = table.get_mut(volume_path) {
            v.users.insert(cid.to_string());
            return Ok((v.storage.clone(), PathBuf::from(&v.storage.mount_point)));
        }
        let meta = std::fs::metadata(&info.device).map_err(|e| {
            invalid(
                volume_path,
                format!("device {} (mountInfo.json \"device\"): {e}", info.device),
            )
        })?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(invalid(
                volume_path,
                format!(
                    "device {} is neither a block device nor a disk image file",
                    info.device
                ),
            ));
        }
        let read_only = info.read_only() || mount_options.iter().any(|o| o == "ro");
        let block_id = format!("dv{}", NEXT_BLOCK.fetch_add(1, Ordering::Relaxed));
        let t = Instant::now();
        let addr = self
            .vm
            .add_block(&BlockDevice {
                id: block_id.clone(),
                path: PathBuf::from(&info.device),
                is_block_device,
                read_only,
            })
            .await?;
        let hotplug_ms = t.elapsed().as_millis() as u64;
        tracing::info!(volume = volume_path, device = %info.device, ?addr, hotplug_ms, "direct volume hot-plugged");
        let mut options = info.options.clone();
        if read_only && !options.iter().any(|o| o == "ro") {
            options.push("ro".into());
        }
        let guest = PathBuf::from(GUEST_STORAGE_DIR).join(encode(volume_path));
        let storage = Storage {
            driver: addr.driver().into(),
            source: addr.address(),
            fstype: info.fstype.clone(),
            options,
            mount_point: guest.display().to_string(),
            ..Default::default()
        };
        if let Err(e) = Store::default().record_sandbox(volume_path, &self.id) {
            tracing::warn!(error = %e, "direct volume: cannot record the sandbox");
        }
        table.insert(
            volume_path.to_string(),
            Volume {
                block_id,
                device: info.device.clone(),
                storage: storage.clone(),
                users: BTreeSet::from([cid.to_string()]),
            },
        );
        Ok((storage, guest))
    }

    /// Drops container `cid`'s volumes; unplugs those no container uses any more (the agent
    /// has unmounted them when it removed the container).
    pub async fn release_volumes(&self, cid: &str) {
        let mut table = self.volumes.lock().await;
        let unused: Vec<String> = table
            .iter_mut()
            .filter_map(|(path, v)| {
                (v.users.remove(cid) && v.users.is_empty()).then(|| path.clone())
            })
            .collect();
        for path in unused {
            if let Some(v) = table.remove(&path) {
                Store::default().forget_sandbox(&path, &self.id);
                match self.vm.remove_block(&v.block_id).await {
                    Ok(()) => tracing::info!(volume = %path, "direct volume unplugged"),
                    Err(e) => {
                        tracing::warn!(volume = %path, error = %kata_config::error_chain(&e), "direct volume: unplug failed")
                    }
                }
            }
        }
    }

    /// The volume whose host device (or volume path) is `key`: Kata's clients name the device.
    async fn volume_by(&self, key: &str) -> Result<Volume, SandboxError> {
        let table = self.volumes.lock().await;
        table
            .iter()
            .find(|(path, v)| v.device == key || path.as_str() == key)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                SandboxError::NotFound(format!(
                    "direct volume {key} in sandbox {} (mount {key} not found in sandbox: is a container using it?)",
                    self.id
                ))
            })
    }

    /// statfs of the volume in the guest.
    pub async fn volume_stats(&self, key: &str) -> Result<VolumeStats, SandboxError> {
        let v = self.volume_by(key).await?;
        let req = VolumeStatsRequest {
            volume_guest_path: v.storage.mount_point.clone(),
            ..Default::default()
        };
        let r = self
            .agent
            .agent
            .get_volume_stats(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("GetVolumeStats"))?;
        Ok(r.into())
    }

    /// Grows the volume to `size` bytes (answering once the guest's filesystem has grown, within
    /// [`RESIZE_VOLUME_TIMEOUT`]): QEMU learns the new size (`block_resize`), then the
    /// agent grows the filesystem online. Shrinking is refused.
    pub async fn resize_volume(&self, key: &str, size: u64) -> Result<(), SandboxError> {
        let v = self.volume_by(key).await?;
        let current = self.block_size(&v.block_id).await?;
        if size < current {
            return Err(SandboxError::Invalid(format!(
                "direct volume {key}: shrinking is not supported (it has {current} bytes, {size} requested); only growing is"
            )));
        }
        if size > current {
            self.vm.resize_block(&v.block_id, size).await.map_err(|e| {
                SandboxError::Invalid(format!(
                    "direct volume {key}: QEMU cannot give the guest {size} bytes ({}); grow the host device {} first",
                    kata_config::error_chain(&e),
                    v.device
                ))
            })?;
        }
        let req = ResizeVolumeRequest {
            volume_guest_path: v.storage.mount_point.clone(),
            size,
            ..Default::default()
        };
        self.agent
            .agent
            .resize_volume(ctx(RESIZE_VOLUME_TIMEOUT), &req)
            .await
            .map_err(agent_err("ResizeVolume"))?;
        Ok(())
    }

    /// The size QEMU gives the guest for a block node (`query-named-block-nodes`).
    async fn block_size(&self, block_id: &str) -> Result<u64, SandboxError> {
        let node = kata_hypervisor::qemu::block::node_name(block_id);
        let nodes = self
            .vm
            .qmp(
                "query-named-block-nodes",
                Some(serde_json::json!({ "flat": true })),
            )
            .await?;
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n.get("node-name").and_then(|v| v.as_str()) == Some(node.as_str()))
            .and_then(|n| n.get("image")?.get("virtual-size")?.as_u64())
            .ok_or_else(|| SandboxError::NotFound(format!("block node {node}")))
    }
}
