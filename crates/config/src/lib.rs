//! Kata Containers configuration.
//!
//! - [`schema`]: key metadata and the macro that declares each section once;
//! - [`hypervisor`], [`runtime`]: the sections (`[hypervisor.*]`, `[runtime]`, `[agent.kata]`,
//!   `[factory]`, `[image]`);
//! - [`load`]: the search order, reading a file and its `config.d/` drop-ins, unknown keys with
//!   `file:line` and "did you mean";
//! - [`annotations`]: per-pod overrides from OCI annotations, with `enable_annotations` and
//!   `valid_*` glob checks;
//! - [`validate`]: typed validation against the host's limits;
//! - [`generate`]: the shipped `configuration-*.toml` files and `docs/configuration.md`.
//!
//! Priority of values: annotation > file > built-in default.

pub mod annotations;
pub mod error;
pub mod generate;
pub mod hypervisor;
pub mod load;
pub mod runtime;
pub mod schema;
pub mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use annotations::{AnnotationError, AnnotationErrors, ContainerAnnotations};
pub use error::{error_chain, ConfigError};
pub use hypervisor::HypervisorConfig;
pub use load::{ConfigSource, FoundBy, SearchInputs};
pub use runtime::{AgentConfig, FactoryConfig, ImageConfig, RuntimeConfig};
pub use validate::{HostLimits, ValidationError, Warning};

/// The hypervisors a configuration file may describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// QEMU (the only one this runtime can start today).
    Qemu,
    /// Cloud Hypervisor.
    Clh,
    /// Firecracker.
    Firecracker,
    /// Dragonball (built into Kata's runtime-rs).
    Dragonball,
    /// ACRN.
    Acrn,
}

impl HypervisorKind {
    /// Every kind, in the order files are documented.
    pub const ALL: [HypervisorKind; 5] = [
        HypervisorKind::Qemu,
        HypervisorKind::Clh,
        HypervisorKind::Firecracker,
        HypervisorKind::Dragonball,
        HypervisorKind::Acrn,
    ];

    /// Section name under `[hypervisor.*]`.
    pub fn name(self) -> &'static str {
        match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Clh => "clh",
            HypervisorKind::Firecracker => "firecracker",
            HypervisorKind::Dragonball => "dragonball",
            HypervisorKind::Acrn => "acrn",
        }
    }

    /// Parses a section name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Standard executable path in the /opt/kata tree.
    pub fn default_path(self) -> &'static str {
        match self {
            HypervisorKind::Qemu => "/opt/kata/bin/qemu-system-x86_64",
            HypervisorKind::Clh => "/opt/kata/bin/cloud-hypervisor",
            HypervisorKind::Firecracker => "/opt/kata/bin/firecracker",
            HypervisorKind::Dragonball => "",
            HypervisorKind::Acrn => "/opt/kata/bin/acrn-dm",
        }
    }

    /// True when this runtime can start VMs with this hypervisor.
    pub fn is_supported(self) -> bool {
        self == HypervisorKind::Qemu
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A configuration key the files set that the runtime does not act on yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnsupportedKey {
    /// Section, for example `hypervisor.qemu`.
    pub section: String,
    /// Key name.
    pub key: String,
}

/// The effective configuration of one sandbox: files, then annotations, then validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which `[hypervisor.*]` section the file holds.
    pub hypervisor_kind: HypervisorKind,
    /// That section.
    pub hypervisor: HypervisorConfig,
    /// `[agent.kata]`.
    pub agent: AgentConfig,
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// `[factory]`.
    pub factory: FactoryConfig,
    /// `[image]`.
    pub image: ImageConfig,
    /// Where the configuration came from.
    pub source: ConfigSource,
    /// Keys set in the files (or by annotations) to non-default values that are not acted on yet.
    pub unsupported: Vec<UnsupportedKey>,
    /// Adjustments made during validation (clamping and the like).
    pub warnings: Vec<Warning>,
}

/// Path of the main configuration file of a `/opt/kata` install.
pub const DEFAULT_CONFIG_PATH: &str = "/opt/kata/share/defaults/kata-containers/configuration.toml";
/// Administrator override.
pub const ETC_CONFIG_PATH: &str = "/etc/kata-containers/configuration.toml";
/// Distribution packages' location.
pub const USR_SHARE_CONFIG_PATH: &str = "/usr/share/defaults/kata-containers/configuration.toml";
/// Environment variable naming a configuration file.
pub const KATA_CONF_FILE_ENV: &str = "KATA_CONF_FILE";
/// Directories in which a `io.katacontainers.config_path` annotation may choose a file.
pub const CONFIG_DIRS: [&str; 3] = [
    "/etc/kata-containers",
    "/opt/kata/share/defaults/kata-containers",
    "/usr/share/defaults/kata-containers",
];
