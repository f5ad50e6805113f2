//! Validation of an effective configuration against the schema's rules and the host.

use std::fmt;

use serde::Serialize;

use crate::hypervisor::{SharedFs, MAX_BRIDGES, MIN_MEMORY_MIB, MSIZE_9P_RANGE};
use crate::{Config, ConfigError, HypervisorKind};

/// Most vCPUs a QEMU q35 guest is given here.
pub const MAX_VCPUS: u32 = 240;

/// What the host offers; passed in so validation is pure and testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Online CPUs.
    pub cpus: u32,
    /// Total memory in MiB.
    pub memory_mib: u64,
}

impl HostLimits {
    /// Reads this host's CPUs and memory; falls back to 1 CPU / 1 GiB if /proc is unreadable.
    pub fn current() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .and_then(|v| v.parse::<u64>().ok())
                    })
            })
            .map(|kib| kib / 1024)
            .unwrap_or(1024);
        HostLimits { cpus, memory_mib }
    }
}

/// A rule the configuration breaks. Each message names the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// Both `image` and `initrd`.
    #[error("[hypervisor.{kind}] sets both image ({image}) and initrd ({initrd}); set exactly one of them")]
    ImageAndInitrd {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// `image`.
        image: String,
        /// `initrd`.
        initrd: String,
    },
    /// Neither `image` nor `initrd`.
    #[error("[hypervisor.{kind}] sets neither image nor initrd; set exactly one of them")]
    NoImageNorInitrd {
        /// Hypervisor section.
        kind: HypervisorKind,
    },
    /// `default_vcpus = 0`.
    #[error("[hypervisor.{kind}].default_vcpus = 0; it must be at least 1")]
    ZeroVcpus {
        /// Hypervisor section.
        kind: HypervisorKind,
    },
    /// `default_vcpus` above what a guest can have.
    #[error("[hypervisor.{kind}].default_vcpus = {vcpus} is more than the {MAX_VCPUS} vCPUs a guest can have; lower it")]
    TooManyVcpus {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Requested.
        vcpus: u32,
    },
    /// `default_vcpus > default_maxvcpus`.
    #[error("[hypervisor.{kind}].default_vcpus = {vcpus} exceeds default_maxvcpus = {max}; lower default_vcpus or raise default_maxvcpus")]
    VcpusAboveMax {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Requested.
        vcpus: u32,
        /// Effective maximum.
        max: u32,
    },
    /// `default_memory` too small.
    #[error("[hypervisor.{kind}].default_memory = {memory} MiB is below the minimum of {min} MiB")]
    MemoryTooSmall {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Requested.
        memory: u32,
        /// Minimum.
        min: u32,
    },
    /// `default_memory` above what the host or `default_maxmemory` allows.
    #[error(
        "[hypervisor.{kind}].default_memory = {memory} MiB exceeds {limit} MiB ({what}); lower it"
    )]
    MemoryTooLarge {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Requested.
        memory: u32,
        /// Limit.
        limit: u64,
        /// Which limit.
        what: &'static str,
    },
    /// `default_bridges` above 5.
    #[error(
        "[hypervisor.{kind}].default_bridges = {bridges}; allowed values are 0 to {MAX_BRIDGES}"
    )]
    TooManyBridges {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Requested.
        bridges: u32,
    },
    /// `msize_9p` out of range.
    #[error("[hypervisor.{kind}].msize_9p = {msize}; allowed values are {} to {}", MSIZE_9P_RANGE.0, MSIZE_9P_RANGE.1)]
    Msize9p {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Requested.
        msize: u32,
    },
    /// `memory_slots = 0` with hot-plug in use.
    #[error("[hypervisor.{kind}].memory_slots = 0 leaves no slot for memory hot-plug; set it to at least 1 or enable [runtime].static_sandbox_resource_mgmt")]
    NoMemorySlots {
        /// Hypervisor section.
        kind: HypervisorKind,
    },
    /// virtio-fs without a daemon.
    #[error("[hypervisor.{kind}].shared_fs = \"virtio-fs\" needs virtio_fs_daemon (the path of virtiofsd)")]
    NoVirtioFsDaemon {
        /// Hypervisor section.
        kind: HypervisorKind,
    },
    /// A regex of `enable_annotations` does not compile.
    #[error(
        "[hypervisor.{kind}].enable_annotations has an invalid regular expression {pattern:?}"
    )]
    BadRegex {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// The pattern.
        pattern: String,
        /// Cause.
        #[source]
        source: regex::Error,
    },
    /// A glob of a `valid_*` list does not compile.
    #[error("[hypervisor.{kind}].{key} has an invalid glob pattern {pattern:?}")]
    BadGlob {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// The list key.
        key: &'static str,
        /// The pattern.
        pattern: String,
        /// Cause.
        #[source]
        source: glob::PatternError,
    },
    /// `dial_timeout = 0`.
    #[error("[agent.kata].dial_timeout = 0; it must be at least 1 second")]
    ZeroDialTimeout,
    /// Both factory modes.
    #[error("[factory] enable_template = true and vm_cache_number = {0} cannot both be on; VM templating and VMCache are exclusive")]
    TemplateAndCache(u32),
    /// VMCache needs QEMU.
    #[error("[factory].vm_cache_number = {number} needs the qemu hypervisor, not {kind}")]
    CacheNeedsQemu {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// The cache size.
        number: u32,
    },
    /// The VMCache socket must be an absolute path.
    #[error("[factory].vm_cache_endpoint = {0:?} must be an absolute path (default /var/run/kata-containers/cache.sock)")]
    CacheEndpoint(String),
    /// Templating needs QEMU.
    #[error("[factory].enable_template = true needs the qemu hypervisor, not {0}")]
    TemplateNeedsQemu(HypervisorKind),
    /// Templating needs an initrd.
    #[error("[factory].enable_template = true needs an initrd guest: set [hypervisor.{0}].initrd instead of image")]
    TemplateNeedsInitrd(HypervisorKind),
    /// Templating needs virtio-9p.
    #[error("[factory].enable_template = true needs [hypervisor.{kind}].shared_fs = \"virtio-9p\" (now {shared_fs:?})")]
    TemplateNeedsVirtio9p {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// Current value.
        shared_fs: String,
    },
    /// Templating needs the virtio-serial agent channel.
    #[error("[factory].enable_template = true needs the virtio-serial agent channel (a clone cannot have its own vsock context id): set [agent.kata].channel = \"auto\" or \"virtio-serial\"")]
    TemplateNeedsSerial,
    /// Free page reporting would punch holes into the template's memory file.
    #[error("[factory].enable_template = true cannot be combined with [hypervisor.{0}].reclaim_guest_freed_memory = true: QEMU 7.2 gives freed guest pages back by punching them out of the file that backs the RAM, which for a clone is the template's memory file shared by every clone (their memory would be corrupted); set reclaim_guest_freed_memory = false")]
    TemplateAndFreePageReporting(HypervisorKind),
    /// Templating puts the guest RAM in a file of its own.
    #[error("[factory].enable_template = true keeps the guest RAM in <template_path>/memory: it cannot be combined with [hypervisor.{kind}].{key}")]
    TemplateMemoryBackend {
        /// Hypervisor section.
        kind: HypervisorKind,
        /// The key that asks for another backend.
        key: &'static str,
    },
    /// `[runtime].hypervisor_name` names another hypervisor.
    #[error("[runtime].hypervisor_name = {name:?} but the file's hypervisor section is [hypervisor.{kind}]; make them match or remove hypervisor_name")]
    HypervisorNameMismatch {
        /// The section present.
        kind: HypervisorKind,
        /// `hypervisor_name`.
        name: String,
    },
    /// `[runtime].agent_name` is not `kata`.
    #[error("[runtime].agent_name = {0:?}; the only agent is \"kata\"")]
    UnknownAgentName(String),
    /// `[runtime].internetworking_model = "none"` needs no network namespace to make sense.
    #[error("[runtime].experimental = {0:?}: no experimental features exist; remove it")]
    UnknownExperimental(String),
}

/// An adjustment made while validating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Warning {
    /// `default_vcpus` above the host's CPUs: honoured, the vCPUs share the host's CPUs.
    VcpusOversubscribed {
        /// Requested.
        requested: u32,
        /// Host CPUs.
        host: u32,
    },
    /// `default_maxvcpus` clamped to the host's CPUs (or set from 0).
    MaxVcpusClamped {
        /// Requested.
        requested: u32,
        /// Effective.
        effective: u32,
    },
    /// `default_maxmemory` clamped to the host's memory (or set from 0).
    MaxMemoryClamped {
        /// Requested.
        requested: u32,
        /// Effective.
        effective: u32,
    },
    /// `enable_hugepages` turned `enable_mem_prealloc` on.
    HugepagesForcePrealloc,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::VcpusOversubscribed { requested, host } => write!(
                f,
                "default_vcpus = {requested} is more than the host's {host} CPUs; the vCPUs share them"
            ),
            Warning::MaxVcpusClamped {
                requested,
                effective,
            } => write!(
                f,
                "default_maxvcpus = {requested}: using {effective} (the host's CPU count)"
            ),
            Warning::MaxMemoryClamped {
                requested,
                effective,
            } => write!(
                f,
                "default_maxmemory = {requested} MiB: using {effective} MiB (the host's memory)"
            ),
            Warning::HugepagesForcePrealloc => {
                f.write_str("enable_hugepages = true forces enable_mem_prealloc = true")
            }
        }
    }
}

impl Config {
    /// Checks every rule and applies the guide's clamping; records warnings in
    /// [`Config::warnings`].
    pub fn validate(&mut self, host: &HostLimits) -> Result<(), ConfigError> {
        self.validate_inner(host)
            .map_err(|source| ConfigError::Invalid {
                path: self.source.path.clone(),
                source,
            })
    }

    fn validate_inner(&mut self, host: &HostLimits) -> Result<(), ValidationError> {
        let kind = self.hypervisor_kind;
        let mut warnings = Vec::new();
        let h = &mut self.hypervisor;

        match (h.image.is_empty(), h.initrd.is_empty()) {
            (false, false) => {
                return Err(ValidationError::ImageAndInitrd {
                    kind,
                    image: h.image.clone(),
                    initrd: h.initrd.clone(),
                })
            }
            (true, true) => return Err(ValidationError::NoImageNorInitrd { kind }),
            _ => {}
        }

        if h.default_vcpus == 0 {
            return Err(ValidationError::ZeroVcpus { kind });
        }
        // vCPUs beyond the host's CPUs are honoured (they are threads sharing the host's CPUs,
        // as the guide's 5-vCPU pod on a smaller node expects), with a warning; the maximum
        // follows them unless it was set explicitly below.
        let implicit_max = h.default_maxvcpus == 0 || h.default_maxvcpus > host.cpus;
        let mut max = if implicit_max {
            host.cpus
        } else {
            h.default_maxvcpus
        };
        if max != h.default_maxvcpus && h.default_maxvcpus != 0 {
            warnings.push(Warning::MaxVcpusClamped {
                requested: h.default_maxvcpus,
                effective: max,
            });
        }
        if h.default_vcpus > MAX_VCPUS {
            return Err(ValidationError::TooManyVcpus {
                kind,
                vcpus: h.default_vcpus,
            });
        }
        if h.default_vcpus > host.cpus {
            warnings.push(Warning::VcpusOversubscribed {
                requested: h.default_vcpus,
                host: host.cpus,
            });
            if implicit_max {
                max = max.max(h.default_vcpus);
            }
        }
        if h.default_vcpus > max {
            return Err(ValidationError::VcpusAboveMax {
                kind,
                vcpus: h.default_vcpus,
                max,
            });
        }
        h.default_maxvcpus = max;

        if h.default_memory < MIN_MEMORY_MIB {
            return Err(ValidationError::MemoryTooSmall {
                kind,
                memory: h.default_memory,
                min: MIN_MEMORY_MIB,
            });
        }
        if u64::from(h.default_memory) > host.memory_mib {
            return Err(ValidationError::MemoryTooLarge {
                kind,
                memory: h.default_memory,
                limit: host.memory_mib,
                what: "the host's memory",
            });
        }
        let host_mem = u32::try_from(host.memory_mib).unwrap_or(u32::MAX);
        let max_mem = if h.default_maxmemory == 0 || h.default_maxmemory > host_mem {
            host_mem
        } else {
            h.default_maxmemory
        };
        if max_mem != h.default_maxmemory && h.default_maxmemory != 0 {
            warnings.push(Warning::MaxMemoryClamped {
                requested: h.default_maxmemory,
                effective: max_mem,
            });
        }
        if h.default_memory > max_mem {
            return Err(ValidationError::MemoryTooLarge {
                kind,
                memory: h.default_memory,
                limit: u64::from(max_mem),
                what: "default_maxmemory",
            });
        }
        h.default_maxmemory = max_mem;

        if h.default_bridges > MAX_BRIDGES {
            return Err(ValidationError::TooManyBridges {
                kind,
                bridges: h.default_bridges,
            });
        }
        if !(MSIZE_9P_RANGE.0..=MSIZE_9P_RANGE.1).contains(&h.msize_9p) {
            return Err(ValidationError::Msize9p {
                kind,
                msize: h.msize_9p,
            });
        }
        if h.memory_slots == 0 && !self.runtime.static_resources() && kind == HypervisorKind::Qemu {
            return Err(ValidationError::NoMemorySlots { kind });
        }
        if h.shared_fs == SharedFs::VirtioFs
            && h.virtio_fs_daemon.is_empty()
            && kind != HypervisorKind::Dragonball
        {
            return Err(ValidationError::NoVirtioFsDaemon { kind });
        }
        if h.enable_hugepages && !h.enable_mem_prealloc {
            h.enable_mem_prealloc = true;
            warnings.push(Warning::HugepagesForcePrealloc);
        }
        for pattern in &h.enable_annotations {
            regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|source| {
                ValidationError::BadRegex {
                    kind,
                    pattern: pattern.clone(),
                    source,
                }
            })?;
        }
        let lists: [(&'static str, &Vec<String>); 10] = [
            ("valid_hypervisor_paths", &h.valid_hypervisor_paths),
            ("valid_ctlpaths", &h.valid_ctlpaths),
            ("valid_jailer_paths", &h.valid_jailer_paths),
            ("valid_kernel_paths", &h.valid_kernel_paths),
            ("valid_image_paths", &h.valid_image_paths),
            ("valid_initrd_paths", &h.valid_initrd_paths),
            ("valid_firmware_paths", &h.valid_firmware_paths),
            (
                "valid_virtio_fs_daemon_paths",
                &h.valid_virtio_fs_daemon_paths,
            ),
            ("valid_file_mem_backends", &h.valid_file_mem_backends),
            ("valid_entropy_sources", &h.valid_entropy_sources),
        ];
        for (key, patterns) in lists {
            for pattern in patterns.iter().filter(|p| !p.is_empty()) {
                glob::Pattern::new(pattern).map_err(|source| ValidationError::BadGlob {
                    kind,
                    key,
                    pattern: pattern.clone(),
                    source,
                })?;
            }
        }
        for pattern in h
            .valid_vhost_user_store_paths
            .iter()
            .filter(|p| !p.is_empty())
        {
            glob::Pattern::new(pattern).map_err(|source| ValidationError::BadGlob {
                kind,
                key: "valid_vhost_user_store_paths",
                pattern: pattern.clone(),
                source,
            })?;
        }

        if self.agent.dial_timeout == 0 {
            return Err(ValidationError::ZeroDialTimeout);
        }
        let f = &self.factory;
        if f.enable_template {
            if f.vm_cache_number > 0 {
                return Err(ValidationError::TemplateAndCache(f.vm_cache_number));
            }
            if kind != HypervisorKind::Qemu {
                return Err(ValidationError::TemplateNeedsQemu(kind));
            }
            if self.hypervisor.initrd.is_empty() {
                return Err(ValidationError::TemplateNeedsInitrd(kind));
            }
            if self.hypervisor.shared_fs != SharedFs::Virtio9p {
                let shared_fs = crate::schema::to_table(&self.hypervisor)
                    .and_then(|t| {
                        t.get("shared_fs")
                            .and_then(|v| v.as_str().map(str::to_string))
                    })
                    .unwrap_or_default();
                return Err(ValidationError::TemplateNeedsVirtio9p { kind, shared_fs });
            }
            if self.agent.channel == crate::runtime::AgentChannelKind::Vsock {
                return Err(ValidationError::TemplateNeedsSerial);
            }
            if self.hypervisor.reclaim_guest_freed_memory {
                return Err(ValidationError::TemplateAndFreePageReporting(kind));
            }
            for (set, key) in [
                (self.hypervisor.enable_hugepages, "enable_hugepages"),
                (
                    !self.hypervisor.file_mem_backend.is_empty(),
                    "file_mem_backend",
                ),
                (self.hypervisor.enable_mem_prealloc, "enable_mem_prealloc"),
            ] {
                if set {
                    return Err(ValidationError::TemplateMemoryBackend { kind, key });
                }
            }
        }
        if f.vm_cache_number > 0 {
            if kind != HypervisorKind::Qemu {
                return Err(ValidationError::CacheNeedsQemu {
                    kind,
                    number: f.vm_cache_number,
                });
            }
            if !f.vm_cache_endpoint.starts_with('/') {
                return Err(ValidationError::CacheEndpoint(f.vm_cache_endpoint.clone()));
            }
        }
        let r = &self.runtime;
        if !r.hypervisor_name.is_empty() && r.hypervisor_name != kind.name() {
            return Err(ValidationError::HypervisorNameMismatch {
                kind,
                name: r.hypervisor_name.clone(),
            });
        }
        if !r.agent_name.is_empty() && r.agent_name != "kata" {
            return Err(ValidationError::UnknownAgentName(r.agent_name.clone()));
        }
        if let Some(x) = r.experimental.first() {
            return Err(ValidationError::UnknownExperimental(x.clone()));
        }
        self.warnings = warnings;
        Ok(())
    }
}
