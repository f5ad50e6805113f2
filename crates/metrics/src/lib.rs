//! Kata's Prometheus metric families, in the text exposition format (0.0.4) that
//! `promtool check metrics` and Prometheus read.
//!
//! - [`process`]: the families of one host process from `/proc/<pid>`
//!   (`<prefix>_{threads,fds,proc_status,proc_stat,io_stat,netdev}`), used by the shim for
//!   itself (`kata_shim`), QEMU (`kata_hypervisor`) and virtiofsd (`kata_virtiofsd`), and by the
//!   agent for itself (`kata_agent`);
//! - [`guest`]: the guest's families from its `/proc` (`kata_guest_*`), rendered by the agent;
//! - [`text`]: exposition helpers: render a registry, and merge texts from several sources
//!   adding labels (kata-monitor).
//!
//! Every reader takes the root of `/proc` so it is tested on a fake tree; a missing or
//! unreadable entry leaves its family out instead of failing the whole scrape.

pub mod guest;
pub mod process;
pub mod text;

/// Clock ticks per second of `/proc/stat` and `/proc/<pid>/stat` (USER_HZ: 100 on every Linux
/// architecture the runtime supports, host and guest alike).
pub const USER_HZ: f64 = 100.0;

/// Errors building a family (a bug in a name or label set, never the data).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus library refused a family.
    #[error("metric family {name}")]
    Family {
        /// The family.
        name: String,
        /// Cause.
        #[source]
        source: prometheus::Error,
    },
}

/// Adds a gauge family with one label set per `(labels, value)`.
pub fn gauge_family(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
    label_names: &[&str],
    samples: &[(Vec<&str>, f64)],
) -> Result<(), MetricsError> {
    let err = |source| MetricsError::Family {
        name: name.to_string(),
        source,
    };
    if samples.is_empty() {
        return Ok(());
    }
    if label_names.is_empty() {
        let g = prometheus::Gauge::new(name, help).map_err(err)?;
        g.set(samples[0].1);
        registry.register(Box::new(g)).map_err(err)?;
        return Ok(());
    }
    let g =
        prometheus::GaugeVec::new(prometheus::Opts::new(name, help), label_names).map_err(err)?;
    for (labels, v) in samples {
        g.get_metric_with_label_values(labels).map_err(err)?.set(*v);
    }
    registry.register(Box::new(g)).map_err(err)
}
