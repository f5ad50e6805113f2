//! Block devices (virtio-blk, virtio-scsi) and NICs hot-plugged into a running VM.

use super::*;

impl Vm {
    /// Hot-plugs a host block device or disk image (`blockdev-add` + `device_add`) with the
    /// configured driver; returns where the guest finds it. Nothing stays behind on failure.
    pub async fn add_block(&self, dev: &BlockDevice) -> Result<GuestBlockAddr, VmError> {
        let h = &self.hypervisor;
        block::check_driver(h.block_device_driver)?;
        self.qmp("blockdev-add", Some(block::blockdev_add_args(h, dev)))
            .await?;
        let plugged = async {
            let dev_id = block::device_id(&dev.id);
            match h.block_device_driver {
                kata_config::hypervisor::BlockDeviceDriver::VirtioScsi => {
                    self.ensure_scsi_controller().await?;
                    let target = self
                        .next_scsi_target
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if target > 255 {
                        return Err(VmError::Hotplug(
                            "the virtio-scsi controller has no free target id left".into(),
                        ));
                    }
                    self.qmp("device_add", Some(block::scsi_hd_args(dev, target, 0)))
                        .await?;
                    Ok(GuestBlockAddr::Scsi { id: target, lun: 0 })
                }
                _ => {
                    let pci = self.qmp("query-pci", None).await?;
                    let bus = block::hotplug_bus(h, &pci)?;
                    self.qmp("device_add", Some(block::virtio_blk_args(h, dev, &bus)))
                        .await?;
                    let pci = self.qmp("query-pci", None).await?;
                    match block::pci_path(&pci, &dev_id) {
                        Some(p) => Ok(GuestBlockAddr::Pci(p)),
                        None => {
                            let _ = self.remove_device(&dev_id).await;
                            Err(VmError::Hotplug(format!(
                                "{dev_id} was added but is not on the PCI buses"
                            )))
                        }
                    }
                }
            }
        }
        .await;
        if plugged.is_err() {
            let _ = self
                .qmp(
                    "blockdev-del",
                    Some(json!({ "node-name": block::node_name(&dev.id) })),
                )
                .await;
        }
        plugged
    }

    /// The virtio-scsi controller, hot-plugged on first use (no cost to VMs without SCSI
    /// volumes).
    async fn ensure_scsi_controller(&self) -> Result<(), VmError> {
        let pci = self.qmp("query-pci", None).await?;
        if block::has_device(&pci, block::SCSI_CONTROLLER) {
            return Ok(());
        }
        let bus = block::hotplug_bus(&self.hypervisor, &pci)?;
        let mut args =
            json!({ "driver": "virtio-scsi-pci", "id": block::SCSI_CONTROLLER, "bus": bus });
        if self.hypervisor.enable_iommu_platform {
            args["iommu_platform"] = json!(true);
        }
        self.qmp("device_add", Some(args)).await?;
        Ok(())
    }

    /// Whether QEMU still has device `id`.
    async fn has_device(&self, id: &str) -> bool {
        self.qmp(
            "qom-get",
            Some(json!({ "path": format!("/machine/peripheral/{id}"), "property": "type" })),
        )
        .await
        .is_ok()
    }

    /// `device_del`, then waits until the guest has let the device go.
    async fn remove_device(&self, id: &str) -> Result<(), VmError> {
        self.qmp("device_del", Some(json!({ "id": id }))).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.has_device(id).await {
            if Instant::now() >= deadline {
                return Err(VmError::Hotplug(format!(
                    "the guest did not release {id} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Unplugs a block device added by [`Vm::add_block`] and drops its drive.
    pub async fn remove_block(&self, id: &str) -> Result<(), VmError> {
        let dev_id = block::device_id(id);
        if self.has_device(&dev_id).await {
            self.remove_device(&dev_id).await?;
        }
        // The device lets go of its drive when it is finalized, which may come a moment after
        // it disappears from the device tree ("Node ... is in use" until then).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .qmp(
                    "blockdev-del",
                    Some(json!({ "node-name": block::node_name(id) })),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(VmError::Qmp(e))
                    if e.to_string().contains("in use") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Tells QEMU a block device now has `bytes` (`block_resize`; a host block device must
    /// already have grown, a disk image file is grown).
    pub async fn resize_block(&self, id: &str, bytes: u64) -> Result<(), VmError> {
        self.qmp(
            "block_resize",
            Some(json!({ "node-name": block::node_name(id), "size": bytes })),
        )
        .await?;
        Ok(())
    }

    /// Hot-plugs a virtio-net NIC on a tap QEMU opens by name (in its network namespace).
    /// Nothing stays behind on failure.
    pub async fn add_nic(&self, index: usize, nic: &argv::Nic) -> Result<(), VmError> {
        if nic.fd.is_some() {
            return Err(VmError::Hotplug(format!(
                "{}: a tap given as a descriptor (macvtap) cannot be hot-plugged",
                nic.tap
            )));
        }
        let netdev = format!("net{index}");
        self.qmp(
            "netdev_add",
            Some(json!({
                "type": "tap", "id": netdev, "ifname": nic.tap,
                "script": "no", "downscript": "no", "vhost": nic.vhost,
            })),
        )
        .await?;
        self.plug_nic(index, nic, &netdev).await
    }

    /// Hot-plugs a virtio-net NIC on an open tap or macvtap descriptor `fd`, passed to QEMU
    /// over QMP (`getfd`): for a QEMU outside the pod's network namespace (a VM taken from
    /// the VMCache). Nothing stays behind on failure.
    pub async fn add_nic_fd(
        &self,
        index: usize,
        nic: &argv::Nic,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), VmError> {
        use std::os::fd::AsRawFd;
        let (fdname, netdev) = (format!("fd-net{index}"), format!("net{index}"));
        self.qmp
            .lock()
            .await
            .execute_with_fd("getfd", json!({ "fdname": fdname }), fd.as_raw_fd())
            .await?;
        let r = self
            .qmp(
                "netdev_add",
                Some(json!({ "type": "tap", "id": netdev, "fd": fdname, "vhost": false })),
            )
            .await;
        if let Err(e) = r {
            let _ = self.qmp("closefd", Some(json!({ "fdname": fdname }))).await;
            return Err(e);
        }
        self.plug_nic(index, nic, &netdev).await
    }

    /// `device_add`s the virtio-net device of netdev `netdev`; removes the netdev on failure.
    async fn plug_nic(&self, index: usize, nic: &argv::Nic, netdev: &str) -> Result<(), VmError> {
        let added = async {
            let pci = self.qmp("query-pci", None).await?;
            let bus = block::hotplug_bus(&self.hypervisor, &pci)?;
            let mut args = json!({
                "driver": "virtio-net-pci", "id": format!("nic{index}"), "netdev": netdev,
                "mac": nic.mac, "romfile": "", "bus": bus,
            });
            if self.hypervisor.enable_iommu_platform {
                args["iommu_platform"] = json!(true);
            }
            self.qmp("device_add", Some(args)).await
        }
        .await;
        if let Err(e) = added {
            let _ = self.qmp("netdev_del", Some(json!({ "id": netdev }))).await;
            return Err(e);
        }
        Ok(())
    }
}
