//! vCPU and memory hot-plug and unplug (DIMMs, virtio-mem), and the vCPU threads.

use super::*;

impl Vm {
    /// The host thread ids of the vCPUs (QMP `query-cpus-fast`).
    pub async fn vcpu_threads(&self) -> Result<Vec<u32>, VmError> {
        let v = self.qmp("query-cpus-fast", None).await?;
        Ok(parse_cpu_threads(&v))
    }

    /// Hot-plugs `count` vCPUs; returns the ids of the devices added, in order.
    pub async fn add_vcpus(&self, count: u32) -> Result<Vec<String>, VmError> {
        let slots =
            qmp::parse_hotpluggable_cpus(&self.qmp("query-hotpluggable-cpus", None).await?)?;
        let free: Vec<_> = slots.into_iter().filter(|c| c.qom_path.is_none()).collect();
        if (free.len() as u32) < count {
            return Err(VmError::Hotplug(format!(
                "{count} vCPUs requested, {} free slots (raise [hypervisor.qemu].default_maxvcpus)",
                free.len()
            )));
        }
        let mut added = Vec::new();
        // QEMU lists free slots from the highest id down; plug the lowest first.
        for slot in free.iter().rev().take(count as usize) {
            let mut args = serde_json::Map::new();
            args.insert("driver".into(), json!(slot.driver));
            let sid = slot
                .props
                .get("socket-id")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let cid = slot
                .props
                .get("core-id")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let id = format!("cpu-{sid}-{cid}");
            args.insert("id".into(), json!(id));
            for (k, v) in &slot.props {
                args.insert(k.clone(), v.clone());
            }
            self.qmp("device_add", Some(serde_json::Value::Object(args)))
                .await?;
            added.push(id);
        }
        Ok(added)
    }

    /// Unplugs hot-plugged vCPUs by device id: QEMU asks the guest (ACPI), which offlines each
    /// CPU and ejects it. Returns the ids QEMU removed within `timeout`; a CPU the guest kept
    /// is still plugged.
    pub async fn remove_vcpus(
        &self,
        ids: &[String],
        timeout: std::time::Duration,
    ) -> Result<Vec<String>, VmError> {
        for id in ids {
            // A CPU an earlier request already removed is simply not found: the poll below
            // tells what is still there.
            if let Err(e) = self.qmp("device_del", Some(json!({ "id": id }))).await {
                tracing::debug!(cpu = %id, error = %e, "device_del");
            }
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let slots =
                qmp::parse_hotpluggable_cpus(&self.qmp("query-hotpluggable-cpus", None).await?)?;
            let present: Vec<&String> = ids
                .iter()
                .filter(|id| {
                    let path = format!("/machine/peripheral/{id}");
                    slots
                        .iter()
                        .any(|s| s.qom_path.as_deref() == Some(path.as_str()))
                })
                .collect();
            if present.is_empty() || std::time::Instant::now() >= deadline {
                return Ok(ids
                    .iter()
                    .filter(|id| !present.contains(id))
                    .cloned()
                    .collect());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Unplugs a DIMM [`Vm::add_memory`] plugged: the guest offlines its memory and ejects it
    /// (it can when the memory is movable: the guest onlines hot-plugged memory as
    /// `online_movable`), then its backend goes and the host gets the memory back. An error
    /// when the guest has not let it go within `timeout` (the DIMM then stays).
    pub async fn remove_memory(
        &self,
        dimm: &PluggedDimm,
        timeout: std::time::Duration,
    ) -> Result<(), VmError> {
        let present = |devices: &serde_json::Value| {
            devices.as_array().is_some_and(|a| {
                a.iter().any(|d| {
                    d.get("data")
                        .and_then(|x| x.get("id"))
                        .and_then(|v| v.as_str())
                        == Some(dimm.device.as_str())
                })
            })
        };
        // An earlier request the guest completed late has already removed it.
        if present(&self.qmp("query-memory-devices", None).await?) {
            self.qmp("device_del", Some(json!({ "id": dimm.device })))
                .await?;
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !present(&self.qmp("query-memory-devices", None).await?) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(VmError::Hotplug(format!(
                    "the guest did not release DIMM {} ({} MiB) within {} s: its memory holds pages it cannot move",
                    dimm.device,
                    dimm.mib,
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.qmp("object-del", Some(json!({ "id": dimm.backend })))
            .await?;
        Ok(())
    }

    /// Asks the virtio-mem device for `mib` MiB of plugged memory (more or less than now) and
    /// waits up to `timeout` for the guest's driver to plug or unplug it. Returns the MiB the
    /// device holds then.
    pub async fn set_virtio_mem(
        &self,
        mib: u32,
        timeout: std::time::Duration,
    ) -> Result<u32, VmError> {
        let path = format!("/machine/peripheral/{}", argv::VIRTIO_MEM_ID);
        let bytes = u64::from(mib) * 1024 * 1024;
        self.qmp(
            "qom-set",
            Some(json!({ "path": path, "property": "requested-size", "value": bytes })),
        )
        .await?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let size = self
                .qmp("qom-get", Some(json!({ "path": path, "property": "size" })))
                .await?
                .as_u64()
                .unwrap_or(0);
            if size == bytes || std::time::Instant::now() >= deadline {
                return Ok(u32::try_from(size / (1024 * 1024)).unwrap_or(u32::MAX));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Hot-plugs `mib` MiB of memory as one DIMM (with a shared backend when virtio-fs needs it).
    pub async fn add_memory(&self, mib: u32) -> Result<PluggedDimm, VmError> {
        let n = self
            .next_dimm
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("mem{n}");
        let backend = argv::memory_backend(&self.hypervisor, &id, mib);
        let mut obj = serde_json::Map::new();
        let mut parts = backend.split(',');
        obj.insert(
            "qom-type".into(),
            json!(parts.next().unwrap_or("memory-backend-ram")),
        );
        for kv in parts {
            if let Some((k, v)) = kv.split_once('=') {
                let value = match (k, v) {
                    ("size", _) => json!(u64::from(mib) * 1024 * 1024),
                    (_, "on") => json!(true),
                    (_, "off") => json!(false),
                    (_, v) => json!(v),
                };
                obj.insert(k.into(), value);
            }
        }
        // The guest onlines memory in whole blocks (128 MiB on x86): a DIMM must start on a
        // block boundary. QEMU packs devices end to end, so after the rootfs image's NVDIMM
        // (any size) the next DIMM would straddle a block; place it explicitly.
        let addr = next_dimm_addr(&self.qmp("query-memory-devices", None).await?);
        self.qmp("object-add", Some(serde_json::Value::Object(obj)))
            .await?;
        let mut dev = json!({ "driver": "pc-dimm", "id": format!("dimm{n}"), "memdev": id });
        if let Some(addr) = addr {
            dev["addr"] = json!(addr);
        }
        if let Err(e) = self.qmp("device_add", Some(dev)).await {
            let _ = self.qmp("object-del", Some(json!({ "id": id }))).await;
            return Err(e);
        }
        Ok(PluggedDimm {
            device: format!("dimm{n}"),
            backend: id,
            mib,
        })
    }
}

/// A hot-plugged DIMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluggedDimm {
    /// Its device id (`dimmN`).
    pub device: String,
    /// Its memory backend's id (`memN`).
    pub backend: String,
    /// Its size in MiB.
    pub mib: u32,
}

/// Where the next DIMM goes, from a `query-memory-devices` answer: the first memory block
/// boundary after every plugged device, or `None` (QEMU's choice, the start of the hot-plug
/// area) when there is none.
pub(super) fn next_dimm_addr(devices: &serde_json::Value) -> Option<u64> {
    devices
        .as_array()?
        .iter()
        .filter_map(|d| {
            let data = d.get("data")?;
            Some(data.get("addr")?.as_u64()? + data.get("size")?.as_u64()?)
        })
        .max()
        .map(|end| end.div_ceil(MEMORY_BLOCK) * MEMORY_BLOCK)
}

/// The `thread-id`s of a `query-cpus-fast` answer.
pub fn parse_cpu_threads(v: &serde_json::Value) -> Vec<u32> {
    let mut tids: Vec<u32> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("thread-id")?.as_u64())
        .filter_map(|t| u32::try_from(t).ok())
        .collect();
    tids.sort_unstable();
    tids.dedup();
    tids
}
