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
    let status = std::fs::read_to_string(me.dir.join("status")).unwrap_or_default();
    let (_, items) = process::parse_status(&status);
    let item = |name: &str| items.iter().find(|(i, _)| *i == name).map(|(_, v)| *v);
    if let Some(v) = item("vmsize") {
        let _ = gauge_family(
            &r,
            "kata_agent_total_vm",
            "Agent virtual memory size, in bytes.",
            &[],
            &[(vec![], v)],
        );
    }
    if let Some(v) = item("vmrss") {
        let _ = gauge_family(
            &r,
            "kata_agent_total_rss",
            "Agent resident memory, in bytes.",
            &[],
            &[(vec![], v)],
        );
    }
    let stat = std::fs::read_to_string(me.dir.join("stat")).unwrap_or_default();
    let ticks: f64 = process::parse_stat(&stat)
        .iter()
        .filter(|(i, _)| *i == "utime" || *i == "stime")
        .map(|(_, v)| v)
        .sum();
    let _ = gauge_family(
        &r,
        "kata_agent_total_time",
        "Agent CPU time (user and system), in seconds.",
        &[],
        &[(vec![], ticks / 100.0)],
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
