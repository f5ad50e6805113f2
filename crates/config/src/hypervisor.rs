//! `[hypervisor.<name>]`: one schema shared by every hypervisor section, as in Kata.

use serde::{Deserialize, Serialize};

use crate::schema::{config_section, Applies, Dynamic, Support};
use crate::HypervisorKind::{self, Acrn, Clh, Dragonball, Firecracker, Qemu};

const N: Dynamic = Dynamic::No;
const Y: Dynamic = Dynamic::Yes;
const OK: Support = Support::Yes;
const NY: Support = Support::NotYet;
const ALL: Applies = Applies::All;
const QEMU: Applies = Applies::Only(&[Qemu]);
const QEMU_CLH: Applies = Applies::Only(&[Qemu, Clh]);
const QEMU_FC: Applies = Applies::Only(&[Qemu, Firecracker]);
const QEMU_CLH_FC: Applies = Applies::Only(&[Qemu, Clh, Firecracker]);
const QEMU_CLH_DB: Applies = Applies::Only(&[Qemu, Clh, Dragonball]);
const CLH: Applies = Applies::Only(&[Clh]);
const FC: Applies = Applies::Only(&[Firecracker]);
const CTL: Applies = Applies::Only(&[Acrn, Dragonball]);

/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// Smallest guest memory the runtime accepts, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Largest number of PCI bridges (a QEMU/kernel limit, see the guide).
pub const MAX_BRIDGES: u32 = 5;
/// Default 9p message size.
pub const DEFAULT_MSIZE_9P: u32 = 8192;
/// 9p `msize` bounds accepted by the guest kernel.
pub const MSIZE_9P_RANGE: (u32, u32) = (4096, 1_048_576);

/// Filesystem used to share container files with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SharedFs {
    /// virtio-fs with a virtiofsd daemon per sandbox.
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// virtio-9p served by QEMU itself.
    #[serde(rename = "virtio-9p")]
    Virtio9p,
    /// virtio-fs served by nydusd (not supported yet).
    #[serde(rename = "virtio-fs-nydus")]
    VirtioFsNydus,
    /// No shared filesystem (block devices only).
    #[serde(rename = "none")]
    None,
}

/// Block device driver for container rootfs and volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockDeviceDriver {
    /// virtio-scsi controller.
    #[serde(rename = "virtio-scsi")]
    VirtioScsi,
    /// virtio-blk over PCI.
    #[serde(rename = "virtio-blk")]
    VirtioBlk,
    /// virtio-blk over MMIO (Firecracker).
    #[serde(rename = "virtio-mmio")]
    VirtioMmio,
    /// virtio-blk over CCW (s390x).
    #[serde(rename = "virtio-blk-ccw")]
    VirtioBlkCcw,
    /// NVDIMM.
    #[serde(rename = "nvdimm")]
    Nvdimm,
}

/// Asynchronous I/O mechanism QEMU uses for block devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockDeviceAio {
    /// Linux io_uring.
    #[serde(rename = "io_uring")]
    IoUring,
    /// Thread pool.
    #[serde(rename = "threads")]
    Threads,
    /// Linux native AIO.
    #[serde(rename = "native")]
    Native,
}

/// virtio-fs cache mode, passed to virtiofsd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioFsCache {
    /// Metadata and lookups expire (1 s); data cached with close-to-open consistency.
    #[serde(rename = "auto")]
    Auto,
    /// Everything cached, never expires.
    #[serde(rename = "always")]
    Always,
    /// Nothing cached in the guest.
    #[serde(rename = "none", alias = "never")]
    Never,
    /// Metadata cached, data not (virtiofsd `metadata`).
    #[serde(rename = "metadata")]
    Metadata,
}

impl VirtioFsCache {
    /// The name virtiofsd's `--cache` option takes.
    pub fn virtiofsd_name(self) -> &'static str {
        match self {
            VirtioFsCache::Auto => "auto",
            VirtioFsCache::Always => "always",
            VirtioFsCache::Never => "never",
            VirtioFsCache::Metadata => "metadata",
        }
    }
}

/// How to choose the accelerator (an extension over Kata, which always uses KVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accelerator {
    /// KVM when the host's boot probe says it boots the guest, TCG emulation otherwise.
    #[serde(rename = "auto")]
    Auto,
    /// Always KVM; fail when `/dev/kvm` is unusable.
    #[serde(rename = "kvm")]
    Kvm,
    /// Always TCG emulation (slow, works everywhere).
    #[serde(rename = "tcg")]
    Tcg,
}

fn s(v: &str) -> String {
    v.to_string()
}

fn list(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

config_section! {
    /// One `[hypervisor.<name>]` section.
    pub struct HypervisorConfig {
        /// Path to the hypervisor executable. Empty means the hypervisor's standard path under
        /// /opt/kata/bin.
        path: String = String::new(), Dynamic::Path("valid_hypervisor_paths"), OK, ALL;
        /// Glob(3) patterns a `path` annotation must match.
        valid_hypervisor_paths: Vec<String> = Vec::new(), N, OK, ALL;
        /// Path to the control tool of the hypervisor (ACRN `acrnctl`).
        ctlpath: String = String::new(), Dynamic::Path("valid_ctlpaths"), NY, CTL;
        /// Glob(3) patterns a `ctlpath` annotation must match.
        valid_ctlpaths: Vec<String> = Vec::new(), N, NY, CTL;
        /// Path to the Firecracker jailer.
        jailer_path: String = String::new(), Dynamic::Path("valid_jailer_paths"), NY, FC;
        /// Glob(3) patterns a `jailer_path` annotation must match.
        valid_jailer_paths: Vec<String> = Vec::new(), N, NY, FC;
        /// Guest kernel. An uncompressed ELF `vmlinux` boots fastest (PVH entry).
        kernel: String = s("/opt/kata/share/kata-containers/vmlinux.container"), Dynamic::Path("valid_kernel_paths"), OK, ALL;
        /// Glob(3) patterns a `kernel` annotation must match (empty: the annotation is refused).
        valid_kernel_paths: Vec<String> = Vec::new(), N, OK, ALL;
        /// Guest root filesystem disk image (`make install` puts one at
        /// /opt/kata/share/kata-containers/kata-containers.img). QEMU maps it read-only into the
        /// guest as an NVDIMM and the guest runs from it with DAX (`root=/dev/pmem0p1`), so
        /// every sandbox shares one copy in the host's page cache. Exactly one of `image` and
        /// `initrd` must be set.
        image: String = String::new(), Dynamic::Path("valid_image_paths"), OK, ALL;
        /// Glob(3) patterns an `image` annotation must match (empty: the annotation is refused).
        valid_image_paths: Vec<String> = Vec::new(), N, OK, ALL;
        /// Guest initrd holding kata-agent as /init. Exactly one of `image` and `initrd` must be set.
        initrd: String = String::new(), Dynamic::Path("valid_initrd_paths"), OK, ALL;
        /// Glob(3) patterns an `initrd` annotation must match (empty: the annotation is refused).
        valid_initrd_paths: Vec<String> = Vec::new(), N, OK, ALL;
        /// QEMU machine type (`q35` on x86_64, `virt` on arm64).
        machine_type: String = s("q35"), Y, OK, QEMU;
        /// Run the VM as a confidential guest (TDX, SEV, PEF, SE). Disables CPU/memory hot-plug.
        confidential_guest: bool = false, N, NY, QEMU_CLH;
        /// Run QEMU as an unprivileged random user instead of root.
        rootless: bool = false, Y, NY, QEMU;
        /// Regular expressions of the hypervisor annotation names pods may set (full match of
        /// the part after `io.katacontainers.config.hypervisor.`).
        enable_annotations: Vec<String> = Vec::new(), N, OK, ALL;
        /// Extra guest kernel parameters, appended to the runtime's own.
        kernel_params: String = String::new(), Y, OK, ALL;
        /// Guest firmware path (empty: the hypervisor's default).
        firmware: String = String::new(), Dynamic::Path("valid_firmware_paths"), NY, ALL;
        /// Glob(3) patterns a `firmware` annotation must match (empty: the annotation is refused).
        valid_firmware_paths: Vec<String> = Vec::new(), N, NY, ALL;
        /// Firmware volume path (empty: none).
        firmware_volume: String = String::new(), Y, NY, QEMU;
        /// Machine accelerator options appended to `-machine` (for example `nvdimm=on`).
        machine_accelerators: String = String::new(), Y, OK, QEMU;
        /// How to pick the accelerator: `auto` (KVM when the host boot probe succeeds, else TCG
        /// emulation), `kvm` or `tcg`. Not a Kata key: Kata always requires KVM.
        accelerator: Accelerator = Accelerator::Auto, Y, OK, QEMU;
        /// QEMU TCG translation cache size in MiB when emulating (0: QEMU's default). Most of an
        /// emulated QEMU's memory is this cache. Not a Kata key.
        tcg_tb_size: u32 = 32, Y, OK, QEMU;
        /// QEMU seccomp sandbox options (`-sandbox`), empty for none. The shipped file sets
        /// `on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=deny`.
        seccompsandbox: String = String::new(), N, OK, QEMU;
        /// Disable the hypervisor's seccomp filter (Cloud Hypervisor).
        disable_seccomp: bool = false, N, NY, CLH;
        /// CPU features passed to `-cpu` (comma separated).
        cpu_features: String = s("pmu=off"), Y, OK, QEMU;
        /// vCPUs a VM boots with (1 to `default_maxvcpus`; more than the host has share its CPUs).
        default_vcpus: u32 = 1, Y, OK, ALL;
        /// Most vCPUs a VM can grow to by hot-plug; 0 means the host's CPU count.
        default_maxvcpus: u32 = 0, Y, OK, ALL;
        /// PCI bridges added to the VM (0 to 5); each takes up to 30 hot-plugged devices.
        default_bridges: u32 = 1, N, OK, ALL;
        /// Memory in MiB a VM boots with.
        default_memory: u32 = DEFAULT_MEMORY_MIB, Y, OK, ALL;
        /// Memory slots: how many DIMMs can be plugged at once (one per container with a memory
        /// limit; a removed container's DIMM is unplugged and its slot reused).
        memory_slots: u32 = 10, Y, OK, QEMU_CLH_FC;
        /// Most memory in MiB a VM can grow to; 0 means the host's memory.
        default_maxmemory: u32 = 0, Y, OK, ALL;
        /// Memory offset in MiB added to `default_maxmemory` for NVDIMM devices (the rootfs
        /// image's NVDIMM is added on top of it by the runtime).
        memory_offset: u64 = 0, Y, OK, QEMU_FC;
        /// Hot-plug memory with one virtio-mem device instead of a DIMM per container: no slot
        /// limit, and the guest plugs and unplugs memory inside the device. Either way memory a
        /// container asked for goes back to the host when it is removed (hot-plugged memory is
        /// movable in the guest).
        enable_virtio_mem: bool = false, Y, OK, QEMU;
        /// Give memory the guest frees back to the host (virtio-balloon free page reporting):
        /// a container that allocates and frees 1 GiB no longer keeps it on the host. The
        /// guest reports free 4 MiB blocks two seconds after they are freed. Kata has this key
        /// for Cloud Hypervisor and Dragonball (default false there).
        reclaim_guest_freed_memory: bool = true, Y, OK, QEMU;
        /// Never pass host block devices to the guest for container rootfs; share files instead.
        disable_block_device_use: bool = false, Y, OK, ALL;
        /// Shared filesystem: `virtio-fs`, `virtio-9p`, `virtio-fs-nydus` or `none`.
        shared_fs: SharedFs = SharedFs::VirtioFs, Y, OK, QEMU_CLH_DB;
        /// Path to the virtio-fs daemon (virtiofsd).
        virtio_fs_daemon: String = s("/opt/kata/libexec/virtiofsd"), Dynamic::Path("valid_virtio_fs_daemon_paths"), OK, QEMU_CLH_FC;
        /// Glob(3) patterns a `virtio_fs_daemon` annotation must match.
        valid_virtio_fs_daemon_paths: Vec<String> = Vec::new(), N, OK, QEMU_CLH_FC;
        /// DAX cache window in MiB (0: no DAX).
        virtio_fs_cache_size: u32 = 0, Y, NY, QEMU_CLH_FC;
        /// virtio-fs request queue size.
        virtio_fs_queue_size: u32 = 1024, Y, NY, QEMU_CLH_FC;
        /// Extra arguments for virtiofsd. virtiofsd runs confined (`--sandbox namespace
        /// --seccomp kill`); a `--sandbox` or `--seccomp` here replaces that default (and weakens
        /// the guest boundary: see docs/security.md).
        virtio_fs_extra_args: Vec<String> = list(&["--thread-pool-size=1", "-o", "announce_submounts"]), Y, OK, QEMU_CLH_FC;
        /// virtio-fs cache mode: `auto`, `always` or `none` (alias `never`), or `metadata`.
        virtio_fs_cache: VirtioFsCache = VirtioFsCache::Auto, Y, OK, QEMU_CLH_FC;
        /// Block device driver for direct volumes: `virtio-scsi` (a controller is hot-plugged
        /// with the first volume) or `virtio-blk` (one PCI device per volume, on the PCI
        /// bridge); `virtio-mmio`, `virtio-blk-ccw` and `nvdimm` cannot be hot-plugged on q35.
        block_device_driver: BlockDeviceDriver = BlockDeviceDriver::VirtioScsi, Y, OK, ALL;
        /// QEMU block I/O mechanism: `io_uring`, `threads` or `native`.
        block_device_aio: BlockDeviceAio = BlockDeviceAio::IoUring, Y, OK, QEMU;
        /// Set the cache options below on block devices.
        block_device_cache_set: bool = false, Y, OK, QEMU_FC;
        /// Open block devices with O_DIRECT (needs `block_device_cache_set`).
        block_device_cache_direct: bool = false, Y, OK, QEMU_FC;
        /// Ignore flush requests of block devices (needs `block_device_cache_set`).
        block_device_cache_noflush: bool = false, Y, OK, QEMU_FC;
        /// Handle block I/O in a separate I/O thread.
        enable_iothreads: bool = false, Y, NY, QEMU;
        /// Pre-allocate all guest memory at boot.
        enable_mem_prealloc: bool = false, Y, OK, QEMU_FC;
        /// Back guest memory with huge pages (forces `enable_mem_prealloc`).
        enable_hugepages: bool = false, Y, OK, QEMU_CLH_FC;
        /// Use vhost-user block devices.
        enable_vhost_user_store: bool = false, Y, NY, QEMU;
        /// Directory of vhost-user devices (`block/sockets`, `block/devices`).
        vhost_user_store_path: String = s("/var/run/kata-containers/vhost-user"), Dynamic::Path("valid_vhost_user_store_paths"), NY, QEMU;
        /// Glob(3) patterns a `vhost_user_store_path` annotation must match.
        valid_vhost_user_store_paths: Vec<String> = list(&["/var/run/kata-containers/vhost-user"]), N, NY, QEMU;
        /// Seconds to wait for a vhost-user socket to reconnect.
        vhost_user_reconnect_timeout_sec: u32 = 0, Y, NY, QEMU;
        /// Add a vIOMMU (q35 only).
        enable_iommu: bool = false, Y, OK, QEMU_FC;
        /// Set `iommu_platform=on` on virtio devices.
        enable_iommu_platform: bool = false, Y, OK, QEMU;
        /// File backing guest memory (empty: anonymous memory, or a shared memfd when virtio-fs
        /// or vhost-user devices need shared memory).
        file_mem_backend: String = String::new(), Dynamic::Path("valid_file_mem_backends"), OK, QEMU;
        /// Glob(3) patterns a `file_mem_backend` annotation must match.
        valid_file_mem_backends: Vec<String> = Vec::new(), N, OK, QEMU;
        /// Flash images added to the VM (firmware variables, for example).
        pflashes: Vec<String> = Vec::new(), N, NY, QEMU;
        /// Turn on hypervisor and guest kernel debug output.
        enable_debug: bool = false, N, OK, ALL;
        /// Skip the nested-virtualisation checks.
        disable_nesting_checks: bool = false, N, NY, ALL;
        /// 9p message size in bytes (4096 to 1048576).
        msize_9p: u32 = DEFAULT_MSIZE_9P, Y, OK, QEMU_FC;
        /// Attach the guest `image` as a read-only virtio-blk disk (`root=/dev/vda1`) instead of
        /// an NVDIMM: no DAX, so each guest caches the files it reads in its own memory.
        disable_image_nvdimm: bool = false, Y, OK, QEMU;
        /// Hot-plug VFIO devices on the root bus instead of a bridge.
        hotplug_vfio_on_root_bus: bool = false, Y, NY, QEMU_FC;
        /// PCIe root ports to add (q35 only), for hot-plugging large-BAR devices.
        pcie_root_port: u32 = 0, Y, OK, QEMU;
        /// Do not use vhost-net for virtio-net (always effectively true where /dev/vhost-net is missing).
        disable_vhost_net: bool = false, Y, OK, ALL;
        /// Host source of entropy for the guest's virtio-rng.
        entropy_source: String = s("/dev/urandom"), Dynamic::Path("valid_entropy_sources"), OK, QEMU_FC;
        /// Glob(3) patterns an `entropy_source` annotation must match.
        valid_entropy_sources: Vec<String> = list(&["/dev/urandom", "/dev/random", ""]), N, OK, QEMU_FC;
        /// Guest directory of OCI hooks (`prestart`, `poststart`, `poststop` subdirectories of
        /// executables, run by the agent in the guest for every container; put them in the
        /// guest image with `kata-guest-image --add-tree`).
        guest_hook_path: String = String::new(), Y, OK, ALL;
        /// Network bandwidth into the VM in bits per second (0: none): a token bucket (tc tbf)
        /// on each pod interface's tap.
        rx_rate_limiter_max_rate: u64 = 0, Y, OK, QEMU_FC;
        /// Network bandwidth out of the VM in bits per second (0: none): a token bucket (tc tbf)
        /// on each pod interface.
        tx_rate_limiter_max_rate: u64 = 0, Y, OK, QEMU_FC;
        /// Network bandwidth limit of Cloud Hypervisor's rate limiter (bytes/s, 0: none).
        net_rate_limiter_bw_max_rate: u64 = 0, N, NY, CLH;
        /// Initial burst of the network bandwidth limiter.
        net_rate_limiter_bw_one_time_burst: u64 = 0, N, NY, CLH;
        /// Network operations limit (operations/s, 0: none).
        net_rate_limiter_ops_max_rate: u64 = 0, N, NY, CLH;
        /// Initial burst of the network operations limiter.
        net_rate_limiter_ops_one_time_burst: u64 = 0, N, NY, CLH;
        /// Disk bandwidth limit (bytes/s, 0: none).
        disk_rate_limiter_bw_max_rate: u64 = 0, N, NY, CLH;
        /// Initial burst of the disk bandwidth limiter.
        disk_rate_limiter_bw_one_time_burst: u64 = 0, N, NY, CLH;
        /// Disk operations limit (operations/s, 0: none).
        disk_rate_limiter_ops_max_rate: u64 = 0, N, NY, CLH;
        /// Initial burst of the disk operations limiter.
        disk_rate_limiter_ops_one_time_burst: u64 = 0, N, NY, CLH;
        /// Directory where guest memory is dumped when the guest panics (empty: no dump).
        guest_memory_dump_path: String = String::new(), N, NY, QEMU;
        /// Use paging (virtual addresses) when dumping guest memory.
        guest_memory_dump_paging: bool = false, N, NY, QEMU;
        /// Add a swap device to the guest.
        enable_guest_swap: bool = false, Y, NY, QEMU;
        /// Use a legacy serial port as the guest console instead of virtio-console. (The console
        /// is always the legacy serial port here, so early boot messages and panics are logged.)
        use_legacy_serial: bool = false, Y, NY, QEMU;
        /// Do not apply SELinux labels to the hypervisor process.
        disable_selinux: bool = false, N, NY, ALL;
        /// Do not enable SELinux inside the guest.
        disable_guest_selinux: bool = true, N, NY, ALL;
        /// Root filesystem type of the guest image (`ext4`, `xfs`, `erofs`).
        rootfs_type: String = s("ext4"), N, NY, ALL;
    }
}

impl HypervisorConfig {
    /// The executable path, falling back to the hypervisor's standard one when `path` is empty.
    pub fn effective_path(&self, kind: HypervisorKind) -> String {
        if self.path.is_empty() {
            kind.default_path().to_string()
        } else {
            self.path.clone()
        }
    }

    /// True when virtio-fs or another vhost-user device needs guest memory shared with a daemon.
    pub fn needs_shared_memory(&self) -> bool {
        self.shared_fs == SharedFs::VirtioFs || self.enable_vhost_user_store
    }
}
