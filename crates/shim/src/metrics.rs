//! What the shim's `/metrics` answers: the shim's own families (`kata_shim_*`, with the Task
//! API durations), QEMU's (`kata_hypervisor_*`), virtiofsd's (`kata_virtiofsd_*`), the pod
//! overhead, and the agent's text (`kata_agent_*`, `kata_guest_*`). A scrape never fails the
//! pod: a process that is gone or an agent that does not answer within [`AGENT_TIMEOUT`] leaves
//! its families out and counts in `kata_shim_scrape_errors_total{source}`.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use kata_metrics::process::{self, ProcessSource};
use kata_sandbox::Sandbox;
use prometheus::{CounterVec, HistogramOpts, HistogramVec, Opts, Registry};

/// How long a scrape waits for the agent's metrics.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(1);

/// Kata's buckets for RPC durations: 1, 2, 4 ... 512 ms.
fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 10).unwrap_or_else(|_| vec![1.0, 10.0, 100.0])
}

/// The shim's long-lived families.
#[derive(Debug)]
struct Families {
    registry: Registry,
    rpc: HistogramVec,
    errors: CounterVec,
}

static FAMILIES: LazyLock<Option<Families>> = LazyLock::new(|| {
    let registry = Registry::new();
    let rpc = HistogramVec::new(
        HistogramOpts::new(
            "kata_shim_rpc_durations_histogram_milliseconds",
            "Durations of the Task API calls containerd makes to the shim, in ms.",
        )
        .buckets(buckets()),
        &["action"],
    )
    .ok()?;
    let errors = CounterVec::new(
        Opts::new(
            "kata_shim_scrape_errors_total",
            "Parts of a /metrics scrape that could not be collected (source: agent, hypervisor, virtiofsd).",
        ),
        &["source"],
    )
    .ok()?;
    registry.register(Box::new(rpc.clone())).ok()?;
    registry.register(Box::new(errors.clone())).ok()?;
    Some(Families {
        registry,
        rpc,
        errors,
    })
});

/// Times one Task API call: the duration is recorded when the guard is dropped.
#[derive(Debug)]
pub struct RpcTimer {
    action: &'static str,
    start: Instant,
}

/// Starts timing the Task API call `action`.
pub fn rpc_timer(action: &'static str) -> RpcTimer {
    RpcTimer {
        action,
        start: Instant::now(),
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        if let Some(f) = FAMILIES.as_ref() {
            if let Ok(h) = f.rpc.get_metric_with_label_values(&[self.action]) {
                h.observe(self.start.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
}

fn count_error(source: &str) {
    if let Some(f) = FAMILIES.as_ref() {
        if let Ok(c) = f.errors.get_metric_with_label_values(&[source]) {
            c.inc();
        }
    }
}

/// Host CPU seconds of the sandbox's processes and guest CPU seconds at the previous scrape, for
/// the pod overhead.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    host_cpu_secs: f64,
    guest_busy_secs: f64,
}

static LAST_CPU: Mutex<Option<CpuSample>> = Mutex::new(None);

/// A guest family's value from the agent's text (`name{item="x"}` or `name{cpu="total",item="x"}`).
fn guest_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Renders the whole `/metrics` answer.
pub async fn render(sandbox: Option<&Sandbox>) -> String {
    let registry = Registry::new();
    let shim = ProcessSource::this();
    let _ = process::register(&registry, "kata_shim", "Shim", &shim, false);
    let mut agent_text = String::new();
    let mut host = vec![shim.clone()];
    if let Some(sb) = sandbox {
        let qemu = ProcessSource::pid(sb.host_pid());
        if qemu.exists() {
            let _ = process::register(&registry, "kata_hypervisor", "Hypervisor", &qemu, true);
            host.push(qemu);
        } else {
            count_error("hypervisor");
        }
        if let Some(pid) = sb.virtiofsd_pid() {
            let v = ProcessSource::pid(pid);
            if v.exists() {
                let _ = process::register(&registry, "kata_virtiofsd", "virtiofsd", &v, false);
                host.push(v);
            } else {
                count_error("virtiofsd");
            }
        }
        match tokio::time::timeout(AGENT_TIMEOUT, sb.agent_metrics(AGENT_TIMEOUT)).await {
            Ok(Ok(text)) => agent_text = text,
            _ => count_error("agent"),
        }
        pod_overhead(&registry, &host, &agent_text);
    }
    let mut out = kata_metrics::text::render(&registry);
    if let Some(f) = FAMILIES.as_ref() {
        out.push_str(&kata_metrics::text::render(&f.registry));
    }
    out.push_str(&agent_text);
    out
}

/// `kata_shim_pod_overhead_cpu` (percent of one CPU the host spends on the sandbox beyond the
/// guest's own busy time, since the previous scrape) and `kata_shim_pod_overhead_memory_in_bytes`
/// (RSS of QEMU, virtiofsd and the shim beyond the memory the guest uses).
fn pod_overhead(registry: &Registry, host: &[ProcessSource], agent_text: &str) {
    let host_rss: f64 = host
        .iter()
        .map(|p| p.status_item("vmrss").unwrap_or(0.0))
        .sum();
    let total = guest_value(agent_text, "kata_guest_meminfo{item=\"mem_total\"}");
    let avail = guest_value(agent_text, "kata_guest_meminfo{item=\"mem_available\"}");
    if let (Some(t), Some(a)) = (total, avail) {
        let _ = kata_metrics::gauge_family(
            registry,
            "kata_shim_pod_overhead_memory_in_bytes",
            "Host memory (RSS of QEMU, virtiofsd and the shim) beyond what the guest uses, in bytes.",
            &[],
            &[(vec![], (host_rss - (t - a)).max(0.0))],
        );
    }
    let host_cpu: f64 = host.iter().map(ProcessSource::cpu_seconds).sum();
    let guest_busy: Option<f64> = {
        let v: Vec<f64> = ["user", "nice", "system", "irq", "softirq"]
            .iter()
            .filter_map(|i| {
                guest_value(
                    agent_text,
                    &format!("kata_guest_cpu_time{{cpu=\"total\",item=\"{i}\"}}"),
                )
            })
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    let Some(guest_busy) = guest_busy else {
        return;
    };
    let now = CpuSample {
        at: Instant::now(),
        host_cpu_secs: host_cpu,
        guest_busy_secs: guest_busy,
    };
    let prev = LAST_CPU
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(now);
    if let Some(p) = prev {
        let secs = now.at.duration_since(p.at).as_secs_f64();
        if secs > 0.0 {
            let host = now.host_cpu_secs - p.host_cpu_secs;
            let guest = now.guest_busy_secs - p.guest_busy_secs;
            let pct = ((host - guest) / secs * 100.0).max(0.0);
            let _ = kata_metrics::gauge_family(
                registry,
                "kata_shim_pod_overhead_cpu",
                "Host CPU the sandbox uses beyond the guest's own busy time since the previous scrape, in percent of one CPU.",
                &[],
                &[(vec![], pct)],
            );
        }
    }
}
