//! The agent's `GetMetrics` answer, in the Prometheus text format: the agent's own process
//! (`kata_agent_*`) and the guest (`kata_guest_*`, see [`kata_metrics::guest`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use kata_metrics::gauge_family;
use kata_metrics::process::{self, ProcessSource};

static SCRAPES: AtomicU64 = AtomicU64::new(0);

/// Renders the agent's and the guest's families.
pub fn render(containers: usize) -> String {
    let scrapes = SCRAPES.fetch_add(1, Ordering::Relaxed) + 1;
    let r = prometheus::Registry::new();
    let me = ProcessSource::this();
    let _ = process::register(&r, "kata_agent", "Agent", &me, false);
    if let Some(v) = me.status_item("vmsize") {
        let _ = gauge_family(
            &r,
            "kata_agent_total_vm",
            "Agent virtual memory size, in bytes.",
            &[],
            &[(vec![], v)],
        );
    }
    if let Some(v) = me.status_item("vmrss") {
        let _ = gauge_family(
            &r,
            "kata_agent_total_rss",
            "Agent resident memory, in bytes.",
            &[],
            &[(vec![], v)],
        );
    }
    let _ = gauge_family(
        &r,
        "kata_agent_total_time",
        "Agent CPU time (user and system), in seconds.",
        &[],
        &[(vec![], me.cpu_seconds())],
    );
    let _ = gauge_family(
        &r,
        "kata_agent_scrape_count",
        "Metrics requests the agent has answered.",
        &[],
        &[(vec![], scrapes as f64)],
    );
    let _ = gauge_family(
        &r,
        "kata_agent_containers",
        "Containers the agent runs.",
        &[],
        &[(vec![], containers as f64)],
    );
    let _ = kata_metrics::guest::register(&r, Path::new("/proc"));
    kata_metrics::text::render(&r)
}
