//! Guest metrics in the Prometheus text format.

use std::fmt::Write as _;

/// Renders the agent's metrics.
pub fn render(containers: usize) -> String {
    let mut out = String::new();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    out.push_str("# HELP kata_guest_meminfo Guest /proc/meminfo, in bytes.\n# TYPE kata_guest_meminfo gauge\n");
    for line in meminfo.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            if let Ok(v) = v.parse::<u64>() {
                let bytes = if parts.next() == Some("kB") {
                    v * 1024
                } else {
                    v
                };
                let _ = writeln!(
                    out,
                    "kata_guest_meminfo{{item=\"{}\"}} {bytes}",
                    k.trim_end_matches(':')
                );
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    out.push_str("# HELP kata_guest_load Guest load average.\n# TYPE kata_guest_load gauge\n");
    for (item, v) in ["load1", "load5", "load15"]
        .iter()
        .zip(load.split_whitespace())
    {
        let _ = writeln!(out, "kata_guest_load{{item=\"{item}\"}} {v}");
    }
    out.push_str("# HELP kata_agent_containers Containers the agent runs.\n# TYPE kata_agent_containers gauge\n");
    let _ = writeln!(out, "kata_agent_containers {containers}");
    out
}
