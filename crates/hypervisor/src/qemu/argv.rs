//! The QEMU command line: a pure function from the effective configuration and the sandbox's
//! runtime choices to argv. No I/O, so it is tested with golden argv.

use std::path::PathBuf;

use kata_config::hypervisor::HypervisorConfig;

use crate::probe::Accel;

/// How the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// Kernel vhost-vsock with this guest CID.
    Vsock {
        /// Guest context id.
        cid: u32,
    },
    /// A virtio-serial port backed by a unix socket QEMU listens on.
    Serial {
        /// Socket path.
        socket: PathBuf,
    },
}

/// The shared filesystem device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedFsDevice {
    /// vhost-user-fs through virtiofsd's socket.
    VirtioFs {
        /// virtiofsd socket.
        socket: PathBuf,
    },
    /// virtio-9p served by QEMU from a host directory.
    Virtio9p {
        /// Shared directory.
        dir: PathBuf,
    },
    /// None.
    None,
}

/// Everything besides the configuration that shapes argv.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Sandbox id (QEMU `-name`).
    pub id: String,
    /// Accelerator.
    pub accel: Accel,
    /// Agent channel.
    pub channel: AgentChannel,
    /// Shared filesystem.
    pub shared_fs: SharedFsDevice,
    /// QMP socket.
    pub qmp_socket: PathBuf,
    /// Console log file.
    pub console_log: PathBuf,
    /// PID file.
    pub pid_file: PathBuf,
    /// vCPUs at boot (may differ from `default_vcpus` with static resource management).
    pub vcpus: u32,
    /// Memory at boot in MiB.
    pub memory_mib: u32,
    /// Kernel parameters added by the runtime (agent options and the like).
    pub extra_kernel_params: Vec<String>,
    /// The debug console's unix socket, for a virtio-serial port named
    /// [`kata_protocols::console::DEBUG_CONSOLE_PORT_NAME`] (with the serial agent channel
    /// only; over vsock the agent listens on its vsock port).
    pub debug_console: Option<PathBuf>,
    /// Network namespace QEMU starts in (the pod's, holding the taps).
    pub netns: Option<PathBuf>,
    /// virtio-net NICs.
    pub nics: Vec<Nic>,
    /// Size in bytes of the guest rootfs image (`image`), which the caller measured; 0 when
    /// the guest boots from an initrd.
    pub image_size: u64,
    /// VM templating: the boot RAM is this file instead of the configured backend.
    pub memory_file: Option<MemoryFile>,
    /// Start paused, waiting for a saved device state (`-S -incoming defer`): a template clone.
    pub incoming: bool,
}

/// The boot RAM of a template VM (shared: its pages are the file) or of a clone (private: the
/// clone reads the template's pages and copies only those it writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFile {
    /// The file (on the template's tmpfs).
    pub path: PathBuf,
    /// `share=on` (the template) or `share=off` (a clone).
    pub shared: bool,
}

/// A virtio-net NIC on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Tap name (in QEMU's network namespace).
    pub tap: String,
    /// Guest MAC address.
    pub mac: String,
    /// Use vhost-net.
    pub vhost: bool,
    /// An open tap descriptor QEMU inherits (a macvtap's character device) instead of opening
    /// `tap` by name.
    pub fd: Option<i32>,
}

/// Tag of the shared filesystem (Kata's).
pub const SHARED_FS_TAG: &str = "kataShared";
/// Id of the guest RAM backend at boot.
pub const BOOT_MEMORY_ID: &str = "ram0";
/// Id of the virtio-mem device (`enable_virtio_mem`) and, with `mem-` before it, its backend.
pub const VIRTIO_MEM_ID: &str = "vmem0";
/// Id of the rootfs image's NVDIMM (and of its memory backend, `mem-<id>`).
pub const IMAGE_NVDIMM_ID: &str = "nv0";
/// Id of the rootfs image's drive when it is a virtio-blk disk (`disable_image_nvdimm`).
pub const IMAGE_DRIVE_ID: &str = "image0";
/// The guest's root when it boots from the image through the NVDIMM: the image's first
/// partition, mounted read-only with DAX (the guest executes from the host's page cache).
pub const IMAGE_NVDIMM_ROOT: &[&str] = &[
    "root=/dev/pmem0p1",
    "rootflags=dax",
    "ro",
    "rootfstype=ext4",
];
/// The guest's root when the image is a virtio-blk disk.
pub const IMAGE_BLK_ROOT: &[&str] = &["root=/dev/vda1", "ro", "rootfstype=ext4"];

const MIB: u64 = 1024 * 1024;

/// How the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// From `initrd` (unpacked into guest RAM).
    Initrd,
    /// From `image`, mapped read-only as an NVDIMM (DAX).
    ImageNvdimm,
    /// From `image` as a read-only virtio-blk disk (`disable_image_nvdimm = true`).
    ImageBlock,
}

impl Boot {
    /// How `h` boots.
    pub fn of(h: &HypervisorConfig) -> Boot {
        if h.image.is_empty() {
            Boot::Initrd
        } else if h.disable_image_nvdimm {
            Boot::ImageBlock
        } else {
            Boot::ImageNvdimm
        }
    }
}

/// Kernel parameters the runtime always sets (boot speed and a quiet, panicking guest).
pub const BASE_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    "panic=1",
    "reboot=k",
    "tsc=reliable",
    "no_timer_check",
    "noreplace-smp",
    "rcupdate.rcu_expedited=1",
    "cryptomgr.notests",
    "i8042.direct=1",
    "i8042.dumbkbd=1",
    "i8042.nopnp=1",
    "i8042.noaux=1",
    "net.ifnames=0",
    "iommu=off",
    // Hot-plugged memory goes to ZONE_MOVABLE, which holds only pages the kernel can move:
    // the guest can give it back when a container goes (DIMM unplug, virtio-mem).
    "memhp_default_state=online_movable",
];

fn push(args: &mut Vec<String>, flag: &str, value: impl Into<String>) {
    args.push(flag.to_string());
    args.push(value.into());
}

/// The memory backend object for `size_mib` of guest RAM with id `id`.
pub fn memory_backend(h: &HypervisorConfig, id: &str, size_mib: u32) -> String {
    let shared = h.needs_shared_memory();
    let mut obj = if h.enable_hugepages {
        format!("memory-backend-file,id={id},size={size_mib}M,mem-path=/dev/hugepages,share=on")
    } else if !h.file_mem_backend.is_empty() {
        format!(
            "memory-backend-file,id={id},size={size_mib}M,mem-path={},share=on",
            h.file_mem_backend
        )
    } else if shared {
        format!("memory-backend-memfd,id={id},size={size_mib}M,share=on")
    } else {
        format!("memory-backend-ram,id={id},size={size_mib}M")
    };
    if h.enable_mem_prealloc {
        obj.push_str(",prealloc=on");
    }
    obj
}

/// MiB of memory the virtio-mem device can plug (`enable_virtio_mem`): the room between the boot
/// memory and `default_maxmemory`, in whole 128 MiB memory blocks; 0 without virtio-mem.
pub fn virtio_mem_mib(h: &HypervisorConfig, boot_mib: u32) -> u32 {
    if !h.enable_virtio_mem {
        return 0;
    }
    let room = h.default_maxmemory.saturating_sub(boot_mib);
    room / 128 * 128
}

/// Builds the QEMU argv (without the binary).
pub fn build(h: &HypervisorConfig, s: &LaunchSpec) -> Vec<String> {
    let mut a = Vec::new();
    push(&mut a, "-name", format!("sandbox-{}", s.id));
    let mut machine = h.machine_type.clone();
    if Boot::of(h) == Boot::ImageNvdimm && !h.machine_accelerators.contains("nvdimm") {
        machine.push_str(",nvdimm=on");
    }
    if h.enable_iommu {
        machine.push_str(",kernel-irqchip=split");
    }
    if !h.machine_accelerators.is_empty() {
        machine.push(',');
        machine.push_str(&h.machine_accelerators);
    }
    push(&mut a, "-machine", machine);
    if s.accel == Accel::Tcg && h.tcg_tb_size > 0 {
        push(&mut a, "-accel", format!("tcg,tb-size={}", h.tcg_tb_size));
    } else {
        push(&mut a, "-accel", s.accel.name());
    }
    let base_cpu = match s.accel {
        // QEMU 7.2 aborts on a bare `-cpu host` on some hosts (MSR 0x10a).
        Accel::Kvm => "host,-arch-capabilities",
        Accel::Tcg => "max",
    };
    let cpu = if h.cpu_features.is_empty() {
        base_cpu.to_string()
    } else {
        format!("{base_cpu},{}", h.cpu_features)
    };
    push(&mut a, "-cpu", cpu);
    let max_vcpus = h.default_maxvcpus.max(s.vcpus);
    // Under TCG every vCPU is present from boot and the guest brings up only `s.vcpus` of them
    // (kernel `maxcpus=`): adding one is onlining it in the guest. QEMU 7.2 cannot hot-plug a
    // vCPU reliably under TCG: a new vCPU thread whose TCG context finds every code-cache
    // region taken fails an assertion (tcg_region_initial_alloc__locked) and QEMU dies, and
    // one plugged again after an unplug is freed twice.
    let present = if parked_vcpus(s, h) {
        max_vcpus
    } else {
        s.vcpus
    };
    push(&mut a, "-smp", format!("{present},maxcpus={max_vcpus}"));
    let boot = Boot::of(h);
    // The NVDIMM lives in the hot-plug memory area: it takes a slot and its size (in whole
    // MiB) on top of the memory hot-plug may add; `memory_offset` is Kata's extra room.
    let image_mib = if boot == Boot::ImageNvdimm {
        u32::try_from(s.image_size.div_ceil(MIB)).unwrap_or(u32::MAX)
    } else {
        0
    };
    let offset_mib = u32::try_from(h.memory_offset).unwrap_or(u32::MAX);
    let maxmem = h
        .default_maxmemory
        .max(s.memory_mib)
        .saturating_add(image_mib)
        .saturating_add(offset_mib);
    let slots = if image_mib > 0 {
        h.memory_slots.max(1)
    } else {
        h.memory_slots
    };
    let virtio_mem = virtio_mem_mib(h, s.memory_mib);
    if (slots > 0 || virtio_mem > 0) && maxmem > s.memory_mib {
        let slots = if slots > 0 {
            format!(",slots={slots}")
        } else {
            String::new()
        };
        push(
            &mut a,
            "-m",
            format!("{}M{slots},maxmem={maxmem}M", s.memory_mib),
        );
    } else {
        push(&mut a, "-m", format!("{}M", s.memory_mib));
    }
    let boot_ram = match &s.memory_file {
        Some(f) => format!(
            "memory-backend-file,id={BOOT_MEMORY_ID},size={}M,mem-path={},share={}",
            s.memory_mib,
            f.path.display(),
            if f.shared { "on" } else { "off" }
        ),
        None => memory_backend(h, BOOT_MEMORY_ID, s.memory_mib),
    };
    push(&mut a, "-object", boot_ram);
    push(&mut a, "-numa", format!("node,memdev={BOOT_MEMORY_ID}"));
    if virtio_mem > 0 {
        // First of the memory devices, so it starts the hot-plug area (aligned to 1 GiB): the
        // guest plugs memory in blocks that must not straddle another device. Nothing is
        // plugged at boot; the backend is only address space until the guest plugs memory, so
        // it is never preallocated here (the device preallocates what it plugs instead).
        let mut backend = memory_backend(h, &format!("mem-{VIRTIO_MEM_ID}"), virtio_mem);
        let prealloc = backend.contains(",prealloc=on");
        backend = backend.replace(",prealloc=on", "");
        push(&mut a, "-object", backend);
        push(
            &mut a,
            "-device",
            format!(
                "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev=mem-{VIRTIO_MEM_ID},requested-size=0{}",
                if prealloc { ",prealloc=on" } else { "" }
            ),
        );
    }
    for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        a.push(flag.to_string());
    }
    push(&mut a, "-display", "none");
    push(&mut a, "-vga", "none");
    push(
        &mut a,
        "-serial",
        format!("file:{}", s.console_log.display()),
    );
    push(
        &mut a,
        "-qmp",
        format!("unix:{},server=on,wait=off", s.qmp_socket.display()),
    );
    push(&mut a, "-pidfile", s.pid_file.display().to_string());
    push(&mut a, "-kernel", h.kernel.clone());
    if !h.initrd.is_empty() {
        push(&mut a, "-initrd", h.initrd.clone());
    }
    let mut params: Vec<String> = BASE_KERNEL_PARAMS.iter().map(|p| p.to_string()).collect();
    match boot {
        Boot::Initrd => {}
        Boot::ImageNvdimm => params.extend(IMAGE_NVDIMM_ROOT.iter().map(|p| p.to_string())),
        Boot::ImageBlock => params.extend(IMAGE_BLK_ROOT.iter().map(|p| p.to_string())),
    }
    params.push(if h.enable_debug {
        "debug".into()
    } else {
        "quiet".into()
    });
    if parked_vcpus(s, h) {
        params.push(format!("maxcpus={}", s.vcpus));
    }
    params.extend(s.extra_kernel_params.iter().cloned());
    if !h.kernel_params.is_empty() {
        params.push(h.kernel_params.clone());
    }
    push(&mut a, "-append", params.join(" "));
    if !h.firmware.is_empty() {
        push(&mut a, "-bios", h.firmware.clone());
    }
    if !h.seccompsandbox.is_empty() {
        push(&mut a, "-sandbox", h.seccompsandbox.clone());
    }
    let iommu_platform = if h.enable_iommu_platform {
        ",iommu_platform=on"
    } else {
        ""
    };
    match boot {
        Boot::Initrd => {}
        Boot::ImageNvdimm => {
            // Read-only and shared: every sandbox maps the same page-cache pages of the file,
            // and nothing the guest does can reach it (an unarmed NVDIMM is read-only to the
            // guest kernel, and QEMU maps the file without write permission).
            let align = if s.image_size.is_multiple_of(2 * MIB) {
                ",align=2M"
            } else {
                ""
            };
            push(
                &mut a,
                "-object",
                format!(
                    "memory-backend-file,id=mem-{IMAGE_NVDIMM_ID},mem-path={},size={},readonly=on,share=on{align}",
                    h.image, s.image_size
                ),
            );
            push(
                &mut a,
                "-device",
                format!("nvdimm,id={IMAGE_NVDIMM_ID},memdev=mem-{IMAGE_NVDIMM_ID},unarmed=on"),
            );
        }
        Boot::ImageBlock => {
            push(
                &mut a,
                "-drive",
                format!(
                    "id={IMAGE_DRIVE_ID},file={},if=none,format=raw,readonly=on",
                    h.image
                ),
            );
            push(
                &mut a,
                "-device",
                format!(
                    "virtio-blk-pci,drive={IMAGE_DRIVE_ID},id=vd-{IMAGE_DRIVE_ID}{iommu_platform}"
                ),
            );
        }
    }
    if h.enable_iommu {
        push(
            &mut a,
            "-device",
            "intel-iommu,intremap=on,caching-mode=on,device-iotlb=on",
        );
    }
    // Hot-plug (ACPI) happens on the bridges: the firmware reserves address windows behind
    // them only when asked, and a device plugged into a bridge without windows gets no BARs.
    for i in 0..h.default_bridges {
        push(
            &mut a,
            "-device",
            format!(
                "pci-bridge,bus=pcie.0,id=pci-bridge-{i},chassis_nr={},shpc=off,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
                i + 1
            ),
        );
    }
    for i in 0..h.pcie_root_port {
        push(
            &mut a,
            "-device",
            format!(
                "pcie-root-port,id=rp{i},bus=pcie.0,chassis={},slot={},port={}",
                10 + i,
                i,
                i
            ),
        );
    }
    match &s.channel {
        AgentChannel::Vsock { cid } => {
            push(
                &mut a,
                "-device",
                format!("vhost-vsock-pci,id=vsock0,guest-cid={cid}{iommu_platform}"),
            );
        }
        AgentChannel::Serial { socket } => {
            push(
                &mut a,
                "-device",
                format!("virtio-serial-pci,id=serial0{iommu_platform}"),
            );
            push(
                &mut a,
                "-chardev",
                format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    socket.display()
                ),
            );
            push(
                &mut a,
                "-device",
                format!(
                    "virtserialport,bus=serial0.0,chardev=agent,name={}",
                    kata_protocols::SERIAL_PORT_NAME
                ),
            );
            if let Some(console) = &s.debug_console {
                push(
                    &mut a,
                    "-chardev",
                    format!(
                        "socket,id=debugconsole,path={},server=on,wait=off",
                        console.display()
                    ),
                );
                push(
                    &mut a,
                    "-device",
                    format!(
                        "virtserialport,bus=serial0.0,chardev=debugconsole,name={}",
                        kata_protocols::console::DEBUG_CONSOLE_PORT_NAME
                    ),
                );
            }
        }
    }
    if !h.entropy_source.is_empty() {
        push(
            &mut a,
            "-object",
            format!("rng-random,id=rng0,filename={}", h.entropy_source),
        );
        push(
            &mut a,
            "-device",
            format!("virtio-rng-pci,rng=rng0{iommu_platform}"),
        );
    }
    for (i, n) in s.nics.iter().enumerate() {
        push(
            &mut a,
            "-netdev",
            match n.fd {
                Some(fd) => format!(
                    "tap,id=net{i},fd={fd},vhost={}",
                    if n.vhost { "on" } else { "off" }
                ),
                None => format!(
                    "tap,id=net{i},ifname={},script=no,downscript=no,vhost={}",
                    n.tap,
                    if n.vhost { "on" } else { "off" }
                ),
            },
        );
        push(
            &mut a,
            "-device",
            // romfile= : no iPXE option ROM (it only slows the boot down).
            format!(
                "virtio-net-pci,netdev=net{i},mac={},romfile={iommu_platform}",
                n.mac
            ),
        );
    }
    if h.reclaim_guest_freed_memory {
        push(
            &mut a,
            "-device",
            format!("virtio-balloon-pci,id=balloon0,free-page-reporting=on{iommu_platform}"),
        );
    }
    match &s.shared_fs {
        SharedFsDevice::VirtioFs { socket } => {
            push(
                &mut a,
                "-chardev",
                format!("socket,id=char-fs,path={}", socket.display()),
            );
            push(&mut a, "-device", format!("vhost-user-fs-pci,chardev=char-fs,tag={SHARED_FS_TAG},queue-size={}{iommu_platform}", h.virtio_fs_queue_size));
        }
        SharedFsDevice::Virtio9p { dir } => {
            push(
                &mut a,
                "-fsdev",
                format!(
                    "local,id=fs0,path={},security_model=none,multidevs=remap",
                    dir.display()
                ),
            );
            push(
                &mut a,
                "-device",
                format!("virtio-9p-pci,fsdev=fs0,mount_tag={SHARED_FS_TAG}{iommu_platform}"),
            );
        }
        SharedFsDevice::None => {}
    }
    if s.incoming {
        a.push("-S".to_string());
        push(&mut a, "-incoming", "defer");
    }
    a
}

/// Whether the VM's vCPUs beyond `s.vcpus` are present from boot and parked offline in the
/// guest (TCG, with room to grow) instead of hot-plugged later: see [`build`].
pub fn parked_vcpus(s: &LaunchSpec, h: &HypervisorConfig) -> bool {
    parks_vcpus(s.accel, h, s.vcpus)
}

/// Whether a VM booted with `vcpus` vCPUs under `accel` parks the rest (see [`build`]).
pub fn parks_vcpus(accel: Accel, h: &HypervisorConfig, vcpus: u32) -> bool {
    accel == Accel::Tcg && h.default_maxvcpus > vcpus
}

#[cfg(test)]
mod tests;
