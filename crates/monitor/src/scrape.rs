//! Scraping every sandbox's shim and merging the answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_metrics::text::{merge_into, write, TextFamily};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

use crate::discovery::{CriMeta, Discovery};

/// How long one shim may take to answer.
pub const SHIM_TIMEOUT: Duration = Duration::from_secs(3);

/// The monitor's own families.
#[derive(Debug, Clone)]
pub struct Own {
    registry: Registry,
    running: IntGauge,
    scrapes: IntCounter,
    failed: IntCounter,
    durations: Histogram,
}

impl Own {
    /// Registers `kata_monitor_{running_shim_count,scrape_count,scrape_failed_count,
    /// scrape_durations_histogram_milliseconds}` (Kata's names).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let running = IntGauge::new(
            "kata_monitor_running_shim_count",
            "Shims (sandboxes) found at the last scrape.",
        )?;
        let scrapes = IntCounter::new(
            "kata_monitor_scrape_count",
            "Shim scrapes kata-monitor made.",
        )?;
        let failed = IntCounter::new(
            "kata_monitor_scrape_failed_count",
            "Shim scrapes that failed or timed out.",
        )?;
        let durations = Histogram::with_opts(
            HistogramOpts::new(
                "kata_monitor_scrape_durations_histogram_milliseconds",
                "Duration of one shim scrape, in ms.",
            )
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 10)?),
        )?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(scrapes.clone()))?;
        registry.register(Box::new(failed.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        Ok(Self {
            registry,
            running,
            scrapes,
            failed,
            durations,
        })
    }

    /// The monitor's own families as text.
    pub fn render(&self) -> String {
        kata_metrics::text::render(&self.registry)
    }
}

/// Why a shim's metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The shim did not answer in time.
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// The request failed (no socket, a broken connection).
    #[error("{0}")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The answer is not text.
    #[error("not text: {0}")]
    NotText(#[source] std::string::FromUtf8Error),
    /// The shim answered with an error status.
    #[error("status {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// What it said.
        body: String,
    },
}

/// One shim's `/metrics` (its text) from its monitor socket, or why not.
pub async fn shim_metrics(
    sock: &std::path::Path,
    timeout: Duration,
) -> Result<String, ScrapeError> {
    let got = tokio::time::timeout(
        timeout,
        kata_sandbox::monitor_client::request(sock, hyper::Method::GET, "/metrics", Vec::new()),
    )
    .await;
    match got {
        Err(_) => Err(ScrapeError::Timeout(timeout.as_millis())),
        Ok(Err(e)) => Err(ScrapeError::Request(kata_config_free_chain(&e).into())),
        Ok(Ok((200, body))) => String::from_utf8(body).map_err(ScrapeError::NotText),
        Ok(Ok((status, body))) => Err(ScrapeError::Status {
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        }),
    }
}

fn kata_config_free_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Keeps the families whose name starts with one of `prefixes` (all when empty).
fn filtered(
    families: BTreeMap<String, TextFamily>,
    prefixes: &[String],
) -> BTreeMap<String, TextFamily> {
    if prefixes.is_empty() {
        return families;
    }
    families
        .into_iter()
        .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p.as_str())))
        .collect()
}

/// Scrapes every sandbox in parallel (each bounded by `timeout`) and merges the families, each
/// sample labelled with its sandbox and pod; the monitor's own families come first. A shim that
/// fails or does not answer is left out and counted.
pub async fn all(discovery: &Discovery, own: &Own, timeout: Duration, filter: &[String]) -> String {
    let current = discovery.current().await;
    own.running.set(current.len() as i64);
    let tasks: Vec<_> = current
        .into_iter()
        .map(|(id, meta)| {
            let sock = discovery.dir.join(&id).join("shim-monitor.sock");
            tokio::spawn(async move {
                let t = Instant::now();
                let r = shim_metrics(&sock, timeout).await;
                (id, meta, r, t.elapsed())
            })
        })
        .collect();
    let mut merged: BTreeMap<String, TextFamily> = BTreeMap::new();
    for t in tasks {
        let Ok((id, meta, result, took)) = t.await else {
            own.failed.inc();
            continue;
        };
        own.scrapes.inc();
        own.durations.observe(took.as_secs_f64() * 1000.0);
        match result {
            Ok(text) => merge_into(&mut merged, &text, &labels(&id, &meta)),
            Err(e) => {
                own.failed.inc();
                tracing::warn!(sandbox = %id, error = %e, "shim scrape failed");
            }
        }
    }
    let mut out = String::new();
    let own_text = own.render();
    let mut own_families = BTreeMap::new();
    merge_into(&mut own_families, &own_text, &[]);
    out.push_str(&write(&filtered(own_families, filter)));
    out.push_str(&write(&filtered(merged, filter)));
    out
}

fn labels<'a>(id: &'a str, m: &'a CriMeta) -> [(&'static str, &'a str); 4] {
    [
        ("sandbox_id", id),
        ("cri_uid", m.uid.as_str()),
        ("cri_name", m.name.as_str()),
        ("cri_namespace", m.namespace.as_str()),
    ]
}

/// The shared state of the server.
#[derive(Debug)]
pub struct Monitor {
    /// Sandboxes and CRI metadata.
    pub discovery: Discovery,
    /// Own families.
    pub own: Own,
    /// Per-shim timeout.
    pub timeout: Duration,
}

impl Monitor {
    /// `/metrics`, with an optional `filter_family` list.
    pub async fn metrics(self: &Arc<Self>, filter: &[String]) -> String {
        all(&self.discovery, &self.own, self.timeout, filter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_families_by_prefix() {
        let mut m = BTreeMap::new();
        merge_into(
            &mut m,
            "# TYPE kata_hypervisor_fds gauge\nkata_hypervisor_fds 1\n# TYPE kata_guest_load gauge\nkata_guest_load{item=\"load1\"} 0\n",
            &[],
        );
        let f = filtered(m.clone(), &["kata_guest".to_string()]);
        assert_eq!(f.keys().collect::<Vec<_>>(), vec!["kata_guest_load"]);
        assert_eq!(filtered(m, &[]).len(), 2);
    }

    #[tokio::test]
    async fn no_sandboxes_gives_the_monitors_own_families() {
        let d = tempfile::tempdir().expect("tmp");
        let disc = Discovery::new(d.path().to_path_buf(), d.path().join("cri.sock"));
        let own = Own::new().expect("own");
        let text = all(&disc, &own, Duration::from_millis(100), &[]).await;
        assert!(text.contains("kata_monitor_running_shim_count 0"), "{text}");
        assert!(
            text.contains("# TYPE kata_monitor_scrape_durations_histogram_milliseconds histogram")
        );
    }

    #[tokio::test]
    async fn a_shim_that_does_not_answer_is_skipped_and_counted() {
        let d = tempfile::tempdir().expect("tmp");
        // A socket nobody accepts on: the connect succeeds (backlog) but no answer comes.
        let sb = d.path().join("silent");
        std::fs::create_dir_all(&sb).expect("dir");
        let _l =
            std::os::unix::net::UnixListener::bind(sb.join("shim-monitor.sock")).expect("bind");
        let disc = Discovery::new(d.path().to_path_buf(), d.path().join("cri.sock"));
        let own = Own::new().expect("own");
        let t = Instant::now();
        let r = shim_metrics(&sb.join("shim-monitor.sock"), Duration::from_millis(200)).await;
        assert_eq!(
            r.err().map(|e| e.to_string()).as_deref(),
            Some("no answer within 200 ms")
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        let text = all(&disc, &own, Duration::from_millis(100), &[]).await;
        assert!(text.contains("kata_monitor_running_shim_count 1"), "{text}");
        assert!(
            text.contains("kata_monitor_scrape_failed_count 1"),
            "{text}"
        );
    }
}
