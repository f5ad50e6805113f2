//! Asks the running manager which runtime handlers it has, the proof that a restart took the
//! new configuration. containerd: CRI `Status` with `verbose`, whose `config` is the CRI
//! plugin's configuration as it runs. CRI-O: CRI `Status` (it answers), then its own HTTP API's
//! `GET /config` on the same socket ([`crate::crio::running_config`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::StatusRequest;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{crio, manager, DeployError, Manager};

/// A CRI client on the manager's unix socket.
pub async fn connect(socket: &Path) -> Result<RuntimeServiceClient<Channel>, DeployError> {
    let path: PathBuf = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]")
        .map_err(|e| manager(format!("CRI endpoint: {e}")))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| manager(format!("connect to {}: {e}", socket.display())))?;
    Ok(RuntimeServiceClient::new(channel))
}

async fn handlers_once(which: Manager, socket: &Path) -> Result<Vec<String>, DeployError> {
    let status = connect(socket)
        .await?
        .status(StatusRequest {
            verbose: which == Manager::Containerd,
        })
        .await
        .map_err(|e| manager(format!("CRI Status: {}", e.message())))?
        .into_inner();
    if which == Manager::Crio {
        return crio::handlers_in(&crio::running_config(socket).await?);
    }
    let config = status
        .info
        .get("config")
        .ok_or_else(|| manager("CRI Status has no `config`"))?;
    handlers_in_status_config(config)
}

/// The handler names in the `config` of a verbose CRI Status (JSON).
pub fn handlers_in_status_config(config: &str) -> Result<Vec<String>, DeployError> {
    let v: serde_json::Value =
        serde_json::from_str(config).map_err(|e| manager(format!("CRI Status config: {e}")))?;
    let runtimes = v
        .pointer("/containerd/runtimes")
        .and_then(|r| r.as_object())
        .ok_or_else(|| manager("CRI Status config has no containerd.runtimes"))?;
    let mut names: Vec<String> = runtimes.keys().cloned().collect();
    names.sort();
    Ok(names)
}

/// The handlers of the manager at `socket`, waiting up to `timeout` for it to answer.
pub fn runtime_handlers(
    manager: Manager,
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<String>, DeployError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DeployError::Manager(format!("tokio: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), handlers_once(manager, socket)).await
        }) {
            Ok(Ok(h)) => return Ok(h),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer in 5 s".into(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(DeployError::Manager(format!(
        "{manager} at {} did not answer in {timeout:?}: {last}",
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
