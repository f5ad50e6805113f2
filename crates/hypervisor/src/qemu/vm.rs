//! A running QEMU: spawn it, connect QMP, hot-plug CPUs and memory, stop it, and tell why it
//! died (with the tail of the guest console).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kata_config::hypervisor::HypervisorConfig;
use serde_json::json;
use tokio::sync::watch;

use super::argv::{self, LaunchSpec};
use super::block::{self, BlockDevice, GuestBlockAddr};
use super::qmp::{self, Qmp, QmpError};

/// Errors of the QEMU driver. Each names the file or key involved.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A configured file is missing.
    #[error("{what} {path} does not exist ([hypervisor.qemu].{key})")]
    Missing {
        /// What it is.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Config key.
        key: &'static str,
    },
    /// The network namespace QEMU should start in cannot be opened.
    #[error("cannot open the pod's network namespace {path} to start QEMU in it (was the pod removed meanwhile?)")]
    Netns {
        /// Namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("failed to start {path}")]
    Spawn {
        /// QEMU path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited.
    #[error("QEMU exited ({status}): {stderr}; guest console: {console}")]
    Exited {
        /// Exit status.
        status: String,
        /// QEMU's stderr.
        stderr: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The QMP socket never appeared.
    #[error("QEMU did not open its QMP socket {0} within 10 s")]
    NoQmp(PathBuf),
    /// QMP failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// Saving or loading a template's device state failed.
    #[error("VM templating: {0}")]
    Migration(String),
    /// Hot-plug is impossible.
    #[error("cannot hot-plug: {0}")]
    Hotplug(String),
    /// The configured block driver cannot be hot-plugged.
    #[error("cannot hot-plug: {0}")]
    Driver(#[from] super::block::UnpluggableDriver),
    /// No slot is free for one more device.
    #[error("cannot hot-plug: {0}")]
    NoSlot(#[from] super::block::NoFreeSlot),
    /// A QEMU started by another process (the VMCache server) cannot be taken over.
    #[error("cannot take over QEMU (pid {pid}): {reason}")]
    Adopt {
        /// QEMU's pid.
        pid: u32,
        /// Why.
        reason: String,
    },
}

/// A QEMU process.
#[derive(Debug)]
pub struct Vm {
    /// QEMU's pid.
    pub pid: u32,
    qmp: tokio::sync::Mutex<Qmp>,
    console_log: PathBuf,
    stderr_log: PathBuf,
    exit: watch::Receiver<Option<String>>,
    hypervisor: HypervisorConfig,
    next_dimm: std::sync::atomic::AtomicU32,
    next_scsi_target: std::sync::atomic::AtomicU32,
    /// Set when QEMU is not this process's child (taken over from the VMCache server): it is
    /// watched and killed through this descriptor.
    pidfd: Option<std::sync::Arc<crate::pidfd::PidFd>>,
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

/// The last `lines` lines of the guest console.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let clean: Vec<&str> = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_control()))
        .filter(|l| !l.is_empty())
        .collect();
    let start = clean.len().saturating_sub(lines);
    // A panic's first line says why; its stack trace would push it out of the tail.
    let panic = clean[..start].iter().find(|l| l.contains("Kernel panic"));
    let tail = clean[start..].join(" | ");
    match panic {
        Some(p) => format!("{p} | ... | {tail}"),
        None => tail,
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

/// The guest's memory block size on x86-64 (`/sys/devices/system/memory/block_size_bytes`).
pub const MEMORY_BLOCK: u64 = 128 * 1024 * 1024;

/// Where the next DIMM goes, from a `query-memory-devices` answer: the first memory block
/// boundary after every plugged device, or `None` (QEMU's choice, the start of the hot-plug
/// area) when there is none.
fn next_dimm_addr(devices: &serde_json::Value) -> Option<u64> {
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

impl Vm {
    /// Starts QEMU and connects to its QMP socket.
    pub async fn start(
        qemu: &Path,
        h: &HypervisorConfig,
        spec: &LaunchSpec,
        stderr_log: &Path,
    ) -> Result<Vm, VmError> {
        if !qemu.exists() {
            return Err(VmError::Missing {
                what: "hypervisor binary",
                path: qemu.to_path_buf(),
                key: "path",
            });
        }
        if !Path::new(&h.kernel).exists() {
            return Err(VmError::Missing {
                what: "guest kernel",
                path: PathBuf::from(&h.kernel),
                key: "kernel",
            });
        }
        if !h.initrd.is_empty() && !Path::new(&h.initrd).exists() {
            return Err(VmError::Missing {
                what: "guest initrd",
                path: PathBuf::from(&h.initrd),
                key: "initrd",
            });
        }
        let mut spec = spec.clone();
        if !h.image.is_empty() {
            let meta = std::fs::metadata(&h.image).map_err(|_| VmError::Missing {
                what: "guest rootfs image",
                path: PathBuf::from(&h.image),
                key: "image",
            })?;
            spec.image_size = meta.len();
        }
        let spec = &spec;
        let args = argv::build(h, spec);
        tracing::debug!(?args, "starting QEMU");
        let stderr = std::fs::File::create(stderr_log).map_err(|source| VmError::Spawn {
            path: stderr_log.to_path_buf(),
            source,
        })?;
        let mut cmd = tokio::process::Command::new(qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        // QEMU starts inside the pod's network namespace, where its taps are.
        let netns = match &spec.netns {
            Some(p) => Some(std::fs::File::open(p).map_err(|source| VmError::Netns {
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        if let Some(f) = &netns {
            use std::os::fd::AsRawFd;
            let fd = f.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; fd stays open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // Tap descriptors (macvtaps) are inherited under their own numbers.
        let inherited: Vec<i32> = spec.nics.iter().filter_map(|n| n.fd).collect();
        if !inherited.is_empty() {
            // SAFETY: fcntl(2) is async-signal-safe; the descriptors stay open in the caller
            // until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &inherited {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
            path: qemu.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            tx.send_replace(Some(status));
        });
        let mut vm_exit = exit.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            if let Some(status) = vm_exit.borrow_and_update().clone() {
                return Err(exited(status, stderr_log, &spec.console_log));
            }
            if spec.qmp_socket.exists() {
                match Qmp::connect(&spec.qmp_socket).await {
                    Ok(q) => break q,
                    Err(QmpError::Io { .. }) => {}
                    Err(e) => {
                        // QEMU closing QMP at once is QEMU exiting: say why.
                        let exit = tokio::time::timeout(Duration::from_secs(1), async {
                            while vm_exit.borrow_and_update().is_none() {
                                if vm_exit.changed().await.is_err() {
                                    break;
                                }
                            }
                        })
                        .await;
                        if exit.is_ok() {
                            if let Some(status) = vm_exit.borrow().clone() {
                                return Err(exited(status, stderr_log, &spec.console_log));
                            }
                        }
                        kill_pid(pid);
                        return Err(e.into());
                    }
                }
            }
            if Instant::now() > deadline {
                kill_pid(pid);
                return Err(VmError::NoQmp(spec.qmp_socket.clone()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        Ok(Vm {
            pid,
            qmp: tokio::sync::Mutex::new(qmp),
            console_log: spec.console_log.clone(),
            stderr_log: stderr_log.to_path_buf(),
            exit,
            hypervisor: h.clone(),
            next_dimm: std::sync::atomic::AtomicU32::new(0),
            next_scsi_target: std::sync::atomic::AtomicU32::new(0),
            pidfd: None,
        })
    }

    /// Takes over a running QEMU that another process started (the VMCache server): watches
    /// it through a process descriptor (its exit status is not ours to read) and connects to
    /// its QMP socket, which its previous owner has closed. `name` is the VM's id on QEMU's
    /// command line (`-name sandbox-<name>`). `console_log` and `stderr_log`
    /// are where its output goes now.
    pub async fn adopt(
        pid: u32,
        h: &HypervisorConfig,
        name: &str,
        qmp_socket: &Path,
        console_log: &Path,
        stderr_log: &Path,
    ) -> Result<Vm, VmError> {
        let fail = |reason: String| VmError::Adopt { pid, reason };
        let pidfd =
            crate::pidfd::PidFd::open(pid).map_err(|e| fail(format!("no such process: {e}")))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let wanted = format!("sandbox-{name}");
        if !String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == wanted)
        {
            return Err(fail(format!("it is not the QEMU of VM {name}")));
        }
        let pidfd = std::sync::Arc::new(pidfd);
        let (tx, exit) = watch::channel(None);
        let watched = pidfd.clone();
        tokio::spawn(async move {
            let status = match watched.wait().await {
                Ok(()) => "exited; its status went to the process that started it".to_string(),
                Err(e) => format!("cannot watch it: {e}"),
            };
            tx.send_replace(Some(status));
        });
        // The previous owner may still be closing its QMP session: QEMU greets the next
        // client only then.
        let qmp = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match Qmp::connect(qmp_socket).await {
                    Ok(q) => return Ok(q),
                    Err(QmpError::Io { .. }) | Err(QmpError::Closed) if !pidfd.exited() => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let qmp = match qmp {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                let _ = pidfd.signal(libc::SIGKILL);
                return Err(fail(format!("QMP {}: {e}", qmp_socket.display())));
            }
            Err(_) => {
                let _ = pidfd.signal(libc::SIGKILL);
                return Err(fail(format!(
                    "QMP {} did not greet within 5 s",
                    qmp_socket.display()
                )));
            }
        };
        Ok(Vm {
            pid,
            qmp: tokio::sync::Mutex::new(qmp),
            console_log: console_log.to_path_buf(),
            stderr_log: stderr_log.to_path_buf(),
            exit,
            hypervisor: h.clone(),
            next_dimm: std::sync::atomic::AtomicU32::new(0),
            next_scsi_target: std::sync::atomic::AtomicU32::new(0),
            pidfd: Some(pidfd),
        })
    }

    /// SIGKILLs QEMU (through its process descriptor when it is not our child).
    pub fn kill(&self) {
        match &self.pidfd {
            Some(p) => {
                let _ = p.signal(libc::SIGKILL);
            }
            None => kill_pid(self.pid),
        }
    }

    /// Why QEMU exited, if it did.
    pub fn exit_error(&self) -> Option<VmError> {
        self.exit
            .borrow()
            .clone()
            .map(|status| exited(status, &self.stderr_log, &self.console_log))
    }

    /// Waits until QEMU exits.
    pub async fn wait_exit(&self) -> VmError {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = rx.borrow_and_update().clone() {
                return exited(status, &self.stderr_log, &self.console_log);
            }
            if rx.changed().await.is_err() {
                return exited("unknown".into(), &self.stderr_log, &self.console_log);
            }
        }
    }

    /// The last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail(&self.console_log, lines)
    }

    /// Runs a QMP command.
    pub async fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmError> {
        Ok(self.qmp.lock().await.execute(command, args).await?)
    }

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

    /// VM templating: pauses the VM and writes its device state to `state` (`x-ignore-shared`:
    /// the RAM, a shared file, is not copied). The VM stays paused. The stream goes through the
    /// unix socket `via`, which the caller listens on (QEMU's seccomp sandbox forbids the
    /// `exec:` transport: it spawns a shell).
    pub async fn save_state(&self, state: &Path, via: &Path) -> Result<(), VmError> {
        let _ = std::fs::remove_file(via);
        let listener = tokio::net::UnixListener::bind(via)
            .map_err(|e| VmError::Migration(format!("cannot listen on {}: {e}", via.display())))?;
        self.qmp("stop", None).await?;
        self.qmp("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        self.qmp(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", via.display()) })),
        )
        .await?;
        let copy = async {
            let (mut conn, _) = listener.accept().await?;
            let mut out = tokio::fs::File::create(state).await?;
            tokio::io::copy(&mut conn, &mut out).await?;
            out.sync_all().await?;
            Ok::<_, std::io::Error>(())
        };
        stream_state(SAVING, state, via, copy).await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let v = self.qmp("query-migrate", None).await?;
            match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmError::Migration(format!(
                        "{SAVING} {} failed: {}",
                        state.display(),
                        v.get("error-desc")
                            .and_then(|s| s.as_str())
                            .unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() >= deadline => return Err(too_slow(SAVING, state)),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// A template clone (started with [`LaunchSpec::incoming`]): loads the device state from
    /// `state`, streamed through the unix socket `via` QEMU listens on, and runs the VM.
    pub async fn restore_state(&self, state: &Path, via: &Path) -> Result<(), VmError> {
        let _ = std::fs::remove_file(via);
        self.qmp("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        self.qmp(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", via.display()) })),
        )
        .await?;
        let copy = async {
            let mut input = tokio::fs::File::open(state).await?;
            let mut conn = tokio::net::UnixStream::connect(via).await?;
            tokio::io::copy(&mut input, &mut conn).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut conn).await?;
            Ok::<_, std::io::Error>(())
        };
        stream_state(LOADING, state, via, copy).await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            if let Some(e) = self.exit_error() {
                return Err(e);
            }
            let v = self.qmp("query-status", None).await?;
            match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "inmigrate" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                "inmigrate" => return Err(too_slow(LOADING, state)),
                "paused" | "prelaunch" | "postmigrate" => break,
                other => {
                    return Err(VmError::Migration(format!(
                        "{LOADING} {} left the VM {other}",
                        state.display()
                    )))
                }
            }
        }
        let m = self.qmp("query-migrate", None).await?;
        if let Some(status @ ("failed" | "cancelled")) = m.get("status").and_then(|s| s.as_str()) {
            return Err(VmError::Migration(format!(
                "{LOADING} {} {status}: {}",
                state.display(),
                m.get("error-desc")
                    .and_then(|s| s.as_str())
                    .unwrap_or("no reason given")
            )));
        }
        self.qmp("cont", None).await?;
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

    /// Asks QEMU to quit, then kills it if it is still there after `grace`.
    pub async fn stop(&self, grace: Duration) {
        if self.exit.borrow().is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp("quit", None)).await;
        }
        let mut rx = self.exit.clone();
        let waited = tokio::time::timeout(grace, async {
            while rx.borrow_and_update().is_none() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_err() {
            self.kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
        }
    }
}

fn exited(status: String, stderr_log: &Path, console: &Path) -> VmError {
    let stderr = std::fs::read_to_string(stderr_log).unwrap_or_default();
    let stderr = stderr
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ");
    VmError::Exited {
        status,
        stderr,
        console: console_tail(console, 12),
    }
}

/// How long saving or loading a template's device state may take (it is a few hundred KiB).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

const SAVING: &str = "saving the device state to";
const LOADING: &str = "loading the device state from";

fn too_slow(what: &str, state: &Path) -> VmError {
    VmError::Migration(format!(
        "{what} {} took more than {} s",
        state.display(),
        MIGRATION_TIMEOUT.as_secs()
    ))
}

/// Streams a template's device state (`copy`: through the unix socket `via`) within
/// [`MIGRATION_TIMEOUT`], then removes the socket.
async fn stream_state(
    what: &str,
    state: &Path,
    via: &Path,
    copy: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), VmError> {
    let copied = tokio::time::timeout(MIGRATION_TIMEOUT, copy).await;
    let _ = std::fs::remove_file(via);
    match copied {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(VmError::Migration(format!(
            "{what} {}: {e}",
            state.display()
        ))),
        Err(_) => Err(too_slow(what, state)),
    }
}

fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// SIGKILL a process by pid (ignores errors: it may be gone).
pub fn kill_pid(pid: u32) {
    // (A QEMU we did not start is killed with [`Vm::kill`], through its process descriptor.)
    if pid > 0 {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimms_start_on_a_memory_block_after_the_image() {
        assert_eq!(next_dimm_addr(&json!([])), None);
        let nvdimm = json!([{"type": "nvdimm", "data": {"addr": 0x1_0000_0000u64, "size": 25165824u64, "slot": 0}}]);
        assert_eq!(next_dimm_addr(&nvdimm), Some(0x1_0000_0000 + MEMORY_BLOCK));
        let both = json!([
            {"type": "nvdimm", "data": {"addr": 0x1_0000_0000u64, "size": 25165824u64}},
            {"type": "dimm", "data": {"addr": 0x1_0800_0000u64, "size": 536870912u64}},
        ]);
        assert_eq!(next_dimm_addr(&both), Some(0x1_0800_0000 + 536870912));
    }

    #[test]
    fn cpu_threads_from_query_cpus_fast() {
        let v = json!([
            {"cpu-index": 0, "thread-id": 4321, "qom-path": "/machine/unattached/device[0]"},
            {"cpu-index": 1, "thread-id": 4330, "qom-path": "/machine/peripheral/cpu-1-0"},
            {"cpu-index": 2, "thread-id": 4321},
            {"cpu-index": 3}
        ]);
        assert_eq!(parse_cpu_threads(&v), [4321, 4330]);
        assert!(parse_cpu_threads(&json!({"error": "x"})).is_empty());
    }
}
