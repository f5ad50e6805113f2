//! kata-monitor: every Kata sandbox's metrics on this host, over HTTP.
//!
//! - [`discovery`]: which sandboxes exist (the directories of `/run/vc/sbs`, read at every
//!   request, so sandboxes that existed before the monitor started and those created or removed
//!   later are all seen) and their CRI metadata (pod uid, name, namespace, from the CRI
//!   `ListPodSandbox` of the runtime endpoint, refreshed when the set of sandboxes changes);
//! - [`scrape`]: every sandbox's shim `/metrics` in parallel, each bounded by a timeout, merged
//!   into one text with `sandbox_id`, `cri_uid`, `cri_name`, `cri_namespace` on every sample;
//! - [`server`]: the HTTP endpoints (`/metrics`, `/sandboxes`, `/agent-url`, `/`).

pub mod discovery;
pub mod scrape;
pub mod server;

/// kata-monitor's version (Kata 3.0's monitor announced 0.3.0; this is the runtime's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
