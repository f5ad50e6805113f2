//! Sandboxes on this host and their CRI metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::ListPodSandboxRequest;
use tonic::transport::{Endpoint, Uri};

/// How long a CRI `ListPodSandbox` may take.
const CRI_TIMEOUT: Duration = Duration::from_secs(3);

/// A pod's CRI metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriMeta {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
}

/// The sandboxes whose shim serves a monitor socket under `dir` (`/run/vc/sbs`), sorted.
pub fn sandboxes(dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("shim-monitor.sock").exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// The CRI metadata of the runtime endpoint's pods, refreshed when the set of sandboxes changes
/// (or was never listed). An unreachable endpoint leaves the labels empty, as Kata's does.
#[derive(Debug)]
pub struct Discovery {
    /// The sandboxes directory.
    pub dir: PathBuf,
    /// The CRI runtime endpoint (a unix socket path).
    pub endpoint: PathBuf,
    known: Mutex<(BTreeSet<String>, BTreeMap<String, CriMeta>)>,
}

impl Discovery {
    /// Discovery of `dir`'s sandboxes with CRI metadata from `endpoint`.
    pub fn new(dir: PathBuf, endpoint: PathBuf) -> Self {
        Self {
            dir,
            endpoint,
            known: Mutex::new((BTreeSet::new(), BTreeMap::new())),
        }
    }

    /// The current sandboxes with their metadata (empty metadata when CRI does not know them).
    pub async fn current(&self) -> Vec<(String, CriMeta)> {
        let ids = sandboxes(&self.dir);
        let set: BTreeSet<String> = ids.iter().cloned().collect();
        let stale = {
            let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            k.0 != set || ids.iter().any(|i| !k.1.contains_key(i))
        };
        if stale {
            match tokio::time::timeout(CRI_TIMEOUT, list_pods(&self.endpoint)).await {
                Ok(Ok(meta)) => {
                    *self.known.lock().unwrap_or_else(|e| e.into_inner()) = (set, meta);
                }
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %self.endpoint.display(), error = %e, "CRI ListPodSandbox")
                }
                Err(_) => {
                    tracing::debug!(endpoint = %self.endpoint.display(), "CRI ListPodSandbox timed out")
                }
            }
        }
        let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        ids.into_iter()
            .map(|id| {
                let meta = k.1.get(&id).cloned().unwrap_or_default();
                (id, meta)
            })
            .collect()
    }
}

/// `ListPodSandbox` on a CRI endpoint: pod id -> metadata.
pub async fn list_pods(
    endpoint: &Path,
) -> Result<BTreeMap<String, CriMeta>, Box<dyn std::error::Error + Send + Sync>> {
    let path = endpoint.to_path_buf();
    let channel = Endpoint::try_from("http://[::]")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await?;
    let pods = RuntimeServiceClient::new(channel)
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    Ok(pods
        .into_iter()
        .map(|p| {
            let m = p.metadata.unwrap_or_default();
            (
                p.id,
                CriMeta {
                    uid: m.uid,
                    name: m.name,
                    namespace: m.namespace,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_is_a_directory_with_a_monitor_socket() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("b")).expect("b");
        std::fs::write(d.path().join("b/shim-monitor.sock"), "").expect("b sock");
        std::fs::create_dir_all(d.path().join("a")).expect("a");
        std::fs::write(d.path().join("a/shim-monitor.sock"), "").expect("a sock");
        std::fs::create_dir_all(d.path().join("half-gone")).expect("no socket");
        assert_eq!(sandboxes(d.path()), vec!["a", "b"]);
        assert!(sandboxes(&d.path().join("missing")).is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_cri_endpoint_gives_empty_metadata() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("x")).expect("x");
        std::fs::write(d.path().join("x/shim-monitor.sock"), "").expect("sock");
        let disc = Discovery::new(d.path().to_path_buf(), d.path().join("no-cri.sock"));
        assert_eq!(
            disc.current().await,
            vec![("x".to_string(), CriMeta::default())]
        );
    }
}
