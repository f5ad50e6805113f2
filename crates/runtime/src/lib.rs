//! The runtime core.
//!
//! - [`sandbox`]: a sandbox is a VM (QEMU, virtiofsd) plus its agent; create, resize (the
//!   containers' resource ledger), stop;
//! - [`sandbox_config`]: the configuration a new sandbox runs with (files, annotations, template);
//! - [`agent`]: the ttrpc client of the agent;
//! - [`accel`]: KVM or TCG;
//! - [`cgroups`]: the sandbox's cgroups on the host;
//! - [`network`]: the pod network mirrored into the VM;
//! - [`template`]: VM templating (`[factory] enable_template`);
//! - [`vmcache`]: VMCache (`[factory] vm_cache_number`): the server and its client;
//! - [`ids`]: sandbox, container and exec ids checked before they become paths;
//! - [`monitor_client`]: the HTTP client of a shim's monitor socket;
//! - [`error`]: the errors ([`SandboxError`]).

pub mod accel;
pub mod agent;
pub mod cgroups;
pub mod direct_volume;
pub mod error;
pub mod host;
pub mod ids;
pub mod launch;
pub mod monitor_client;
pub mod network;
pub mod sandbox;
pub mod sandbox_config;
pub mod source;
pub mod template;
pub mod vmcache;

pub use error::SandboxError;
pub use sandbox::volumes::RESIZE_VOLUME_TIMEOUT;
pub use sandbox::{Placement, Sandbox, SandboxPaths, SharedNamespaces};
pub use sandbox_config::SandboxConfig;
