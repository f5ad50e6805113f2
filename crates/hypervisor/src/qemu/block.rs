//! Block device hot-plug: the QMP arguments (`blockdev-add`, `device_add`) for a host block
//! device or disk image under `[hypervisor.qemu]` `block_device_driver`, `block_device_aio`
//! and `block_device_cache_*`, and the device's address in the guest read back from
//! `query-pci`. Pure functions; the QMP calls are in [`super::vm::Vm`].

use std::path::PathBuf;

use kata_config::hypervisor::{BlockDeviceAio, BlockDeviceDriver, HypervisorConfig};
use serde_json::{json, Value};

/// A host block device or regular file to give the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// A short id unique in the VM (`[A-Za-z0-9_-]`): the QMP node is `drive-<id>`, the
    /// device `dev-<id>`.
    pub id: String,
    /// Host path: a block device or a regular file (a raw disk image).
    pub path: PathBuf,
    /// Whether the host path is a block device (`host_device`) or a file (`file`).
    pub is_block_device: bool,
    /// Read-only for the guest.
    pub read_only: bool,
}

/// Where the guest finds a hot-plugged device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestBlockAddr {
    /// A virtio-blk PCI device: slots from the root bus down (`02/01`).
    Pci(String),
    /// A SCSI disk on the VM's virtio-scsi controller.
    Scsi {
        /// Target id.
        id: u32,
        /// LUN.
        lun: u32,
    },
}

impl GuestBlockAddr {
    /// The agent's storage driver for it.
    pub fn driver(&self) -> &'static str {
        match self {
            GuestBlockAddr::Pci(_) => "blk",
            GuestBlockAddr::Scsi { .. } => "scsi",
        }
    }

    /// The agent's storage source for it.
    pub fn address(&self) -> String {
        match self {
            GuestBlockAddr::Pci(p) => p.clone(),
            GuestBlockAddr::Scsi { id, lun } => format!("{id}:{lun}"),
        }
    }
}

/// The QMP node name of a device's drive.
pub fn node_name(id: &str) -> String {
    format!("drive-{id}")
}

/// The QMP id of the guest device.
pub fn device_id(id: &str) -> String {
    format!("dev-{id}")
}

/// The virtio-scsi controller hot-plugged for the first SCSI volume.
pub const SCSI_CONTROLLER: &str = "scsi0";

/// `blockdev-add` arguments.
pub fn blockdev_add_args(h: &HypervisorConfig, dev: &BlockDevice) -> Value {
    let mut file = json!({
        "driver": if dev.is_block_device { "host_device" } else { "file" },
        "filename": dev.path.display().to_string(),
        "aio": match h.block_device_aio {
            BlockDeviceAio::IoUring => "io_uring",
            BlockDeviceAio::Threads => "threads",
            BlockDeviceAio::Native => "native",
        },
        "read-only": dev.read_only,
    });
    let mut top = json!({
        "driver": "raw",
        "node-name": node_name(&dev.id),
        "read-only": dev.read_only,
    });
    if h.block_device_cache_set {
        let cache = json!({
            "direct": h.block_device_cache_direct,
            "no-flush": h.block_device_cache_noflush,
        });
        file["cache"] = cache.clone();
        top["cache"] = cache;
    }
    top["file"] = file;
    top
}

/// `device_add` arguments for a virtio-blk device on `bus`.
pub fn virtio_blk_args(h: &HypervisorConfig, dev: &BlockDevice, bus: &str) -> Value {
    let mut v = json!({
        "driver": "virtio-blk-pci",
        "id": device_id(&dev.id),
        "drive": node_name(&dev.id),
        "bus": bus,
    });
    if h.enable_iommu_platform {
        v["iommu_platform"] = json!(true);
    }
    v
}

/// `device_add` arguments for a SCSI disk on the virtio-scsi controller.
pub fn scsi_hd_args(dev: &BlockDevice, target: u32, lun: u32) -> Value {
    json!({
        "driver": "scsi-hd",
        "id": device_id(&dev.id),
        "drive": node_name(&dev.id),
        "bus": format!("{SCSI_CONTROLLER}.0"),
        "channel": 0,
        "scsi-id": target,
        "lun": lun,
    })
}

/// A `block_device_driver` this runtime cannot hot-plug.
#[derive(Debug, thiserror::Error)]
#[error("block_device_driver = {0:?} cannot be hot-plugged into a q35 VM; use \"virtio-blk\" or \"virtio-scsi\"")]
pub struct UnpluggableDriver(pub String);

/// The driver names this runtime can hot-plug, for errors.
pub fn check_driver(d: BlockDeviceDriver) -> Result<(), UnpluggableDriver> {
    match d {
        BlockDeviceDriver::VirtioBlk | BlockDeviceDriver::VirtioScsi => Ok(()),
        other => Err(UnpluggableDriver(
            serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        )),
    }
}

/// A PCI device in a `query-pci` answer, with the path of slots leading to it.
fn walk<'a>(devices: &'a [Value], prefix: &[u64], out: &mut Vec<(Vec<u64>, &'a Value)>) {
    for d in devices {
        let Some(slot) = d.get("slot").and_then(Value::as_u64) else {
            continue;
        };
        let mut path = prefix.to_vec();
        path.push(slot);
        out.push((path.clone(), d));
        if let Some(children) = d
            .get("pci_bridge")
            .and_then(|b| b.get("devices"))
            .and_then(Value::as_array)
        {
            walk(children, &path, out);
        }
    }
}

fn all_devices(query_pci: &Value) -> Vec<(Vec<u64>, &Value)> {
    let mut out = Vec::new();
    for bus in query_pci.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(devs) = bus.get("devices").and_then(Value::as_array) {
            walk(devs, &[], &mut out);
        }
    }
    out
}

/// The PCI path (`02/01`) of the device with `qdev_id`, from a `query-pci` answer.
pub fn pci_path(query_pci: &Value, qdev_id: &str) -> Option<String> {
    all_devices(query_pci)
        .into_iter()
        .find(|(_, d)| d.get("qdev_id").and_then(Value::as_str) == Some(qdev_id))
        .map(|(path, _)| {
            path.iter()
                .map(|s| format!("{s:02x}"))
                .collect::<Vec<_>>()
                .join("/")
        })
}

/// Whether a device with `qdev_id` is on the PCI buses.
pub fn has_device(query_pci: &Value, qdev_id: &str) -> bool {
    pci_path(query_pci, qdev_id).is_some()
}

/// No PCI bridge or root port has a free slot for one more device.
#[derive(Debug, thiserror::Error)]
#[error("no free hot-pluggable PCI slot ({bridges} PCI bridges, {root_ports} PCIe root ports): raise [hypervisor.qemu].default_bridges or pcie_root_port")]
pub struct NoFreeSlot {
    /// `default_bridges`.
    pub bridges: u32,
    /// `pcie_root_port`.
    pub root_ports: u32,
}

/// A hot-pluggable bus for a new PCI device: the first PCI bridge (`pci-bridge-N`, 31 slots)
/// with a free slot, else an empty PCIe root port (`rpN`).
pub fn hotplug_bus(h: &HypervisorConfig, query_pci: &Value) -> Result<String, NoFreeSlot> {
    let devices = all_devices(query_pci);
    let children = |id: &str| -> Option<usize> {
        devices
            .iter()
            .find(|(_, d)| d.get("qdev_id").and_then(Value::as_str) == Some(id))
            .map(|(_, d)| {
                d.get("pci_bridge")
                    .and_then(|b| b.get("devices"))
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
            })
    };
    for i in 0..h.default_bridges {
        let id = format!("pci-bridge-{i}");
        if children(&id).is_some_and(|n| n < 31) {
            return Ok(id);
        }
    }
    for i in 0..h.pcie_root_port {
        let id = format!("rp{i}");
        if children(&id) == Some(0) {
            return Ok(id);
        }
    }
    Err(NoFreeSlot {
        bridges: h.default_bridges,
        root_ports: h.pcie_root_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HypervisorConfig {
        HypervisorConfig::default()
    }

    fn dev() -> BlockDevice {
        BlockDevice {
            id: "dv0".into(),
            path: "/dev/loop3".into(),
            is_block_device: true,
            read_only: false,
        }
    }

    #[test]
    fn blockdev_honours_aio_cache_and_read_only() {
        let mut h = cfg();
        h.block_device_aio = BlockDeviceAio::Threads;
        let v = blockdev_add_args(&h, &dev());
        assert_eq!(
            v,
            json!({"driver":"raw","node-name":"drive-dv0","read-only":false,
                   "file":{"driver":"host_device","filename":"/dev/loop3","aio":"threads","read-only":false}})
        );
        h.block_device_cache_set = true;
        h.block_device_cache_direct = true;
        h.block_device_aio = BlockDeviceAio::Native;
        let mut d = dev();
        d.read_only = true;
        d.is_block_device = false;
        d.path = "/var/lib/disk.img".into();
        let v = blockdev_add_args(&h, &d);
        assert_eq!(v["read-only"], json!(true));
        assert_eq!(v["file"]["driver"], json!("file"));
        assert_eq!(v["file"]["aio"], json!("native"));
        assert_eq!(v["cache"], json!({"direct": true, "no-flush": false}));
        assert_eq!(
            v["file"]["cache"],
            json!({"direct": true, "no-flush": false})
        );
    }

    #[test]
    fn devices_name_their_drive() {
        let v = virtio_blk_args(&cfg(), &dev(), "pci-bridge-0");
        assert_eq!(
            v,
            json!({"driver":"virtio-blk-pci","id":"dev-dv0","drive":"drive-dv0","bus":"pci-bridge-0"})
        );
        let v = scsi_hd_args(&dev(), 3, 0);
        assert_eq!(v["bus"], json!("scsi0.0"));
        assert_eq!(v["scsi-id"], json!(3));
        assert!(check_driver(BlockDeviceDriver::VirtioMmio).is_err());
        assert!(check_driver(BlockDeviceDriver::VirtioBlk).is_ok());
    }

    fn query_pci() -> Value {
        json!([{"bus":0,"devices":[
            {"bus":0,"slot":0,"function":0,"qdev_id":""},
            {"bus":0,"slot":2,"function":0,"qdev_id":"pci-bridge-0",
             "pci_bridge":{"bus":{"number":1},"devices":[
                {"bus":1,"slot":1,"function":0,"qdev_id":"dev-dv0"}]}},
            {"bus":0,"slot":3,"function":0,"qdev_id":"rp0","pci_bridge":{"bus":{"number":2},"devices":[]}},
            {"bus":0,"slot":4,"function":0,"qdev_id":"serial0"}]}])
    }

    #[test]
    fn pci_paths_from_query_pci() {
        let q = query_pci();
        assert_eq!(pci_path(&q, "dev-dv0").as_deref(), Some("02/01"));
        assert_eq!(pci_path(&q, "serial0").as_deref(), Some("04"));
        assert_eq!(pci_path(&q, "dev-nope"), None);
    }

    #[test]
    fn hot_plug_goes_to_a_bridge_then_a_root_port() {
        let q = query_pci();
        let mut h = cfg();
        h.default_bridges = 1;
        assert_eq!(hotplug_bus(&h, &q).ok().as_deref(), Some("pci-bridge-0"));
        h.default_bridges = 0;
        h.pcie_root_port = 1;
        assert_eq!(hotplug_bus(&h, &q).ok().as_deref(), Some("rp0"));
        h.pcie_root_port = 0;
        let e = hotplug_bus(&h, &q).expect_err("none");
        assert!(e.to_string().contains("default_bridges"), "{e}");
    }
}
