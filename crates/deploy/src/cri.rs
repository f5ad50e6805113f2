//! Asks the running containerd which runtime handlers its CRI plugin has (`Status` with
//! `verbose`, whose `config` is the plugin's configuration as it runs), as a kubelet would see
//! them: the proof that a restart took the new configuration.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::StatusRequest;
use tonic::transport::{Endpoint, Uri};

use crate::DeployError;

async fn handlers_once(socket: &Path) -> Result<Vec<String>, String> {
    let path: PathBuf = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let status = RuntimeServiceClient::new(channel)
        .status(StatusRequest { verbose: true })
        .await
        .map_err(|e| format!("CRI Status: {}", e.message()))?
        .into_inner();
    let config = status
        .info
        .get("config")
        .ok_or("CRI Status has no `config`")?;
    handlers_in_status_config(config)
}

/// The handler names in the `config` of a verbose CRI Status (JSON).
pub fn handlers_in_status_config(config: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(config).map_err(|e| format!("CRI Status config: {e}"))?;
    let runtimes = v
        .pointer("/containerd/runtimes")
        .and_then(|r| r.as_object())
        .ok_or("CRI Status config has no containerd.runtimes")?;
    let mut names: Vec<String> = runtimes.keys().cloned().collect();
    names.sort();
    Ok(names)
}

/// The handlers of the containerd at `socket`, waiting up to `timeout` for it to answer.
pub fn runtime_handlers(socket: &Path, timeout: Duration) -> Result<Vec<String>, DeployError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DeployError::Manager(format!("tokio: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), handlers_once(socket)).await
        }) {
            Ok(Ok(h)) => return Ok(h),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer in 5 s".into(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(DeployError::Manager(format!(
        "containerd at {} did not answer in {timeout:?}: {last}",
        socket.display()
    )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn handlers_from_a_status_config() {
        let c = r#"{"containerd":{"defaultRuntimeName":"runc","runtimes":{"runc":{},"kata":{"runtimeType":"io.containerd.kata.v2"}}}}"#;
        assert_eq!(
            super::handlers_in_status_config(c).expect("parse"),
            ["kata", "runc"]
        );
        assert!(super::handlers_in_status_config("{}").is_err());
        assert!(super::handlers_in_status_config("nope").is_err());
    }
}
