//! The node's label `katacontainers.io/kata-runtime=true`, which the RuntimeClasses' node
//! selector matches: set once the runtime is installed and containerd runs with it, removed
//! first on uninstall (so no kata pod is scheduled to a node losing it). Through the Kubernetes
//! API with the pod's service account (RBAC: nodes get and patch), or an explicit API URL.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};

use crate::DeployError;

/// The label the RuntimeClasses select nodes by.
pub const LABEL: &str = "katacontainers.io/kata-runtime";

fn err(what: &str) -> impl Fn(kube::Error) -> DeployError + '_ {
    move |e| DeployError::Manager(format!("{what}: {e}"))
}

async fn client(api: Option<&str>) -> Result<kube::Client, DeployError> {
    // Both of rustls' providers are linked into the workspace: pick one (an error means one was
    // installed already, which is as good).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match api {
        Some(url) => {
            let uri = url
                .parse()
                .map_err(|e| DeployError::Config(format!("--kube-api {url}: {e}")))?;
            kube::Client::try_from(kube::Config::new(uri)).map_err(err("a Kubernetes client"))
        }
        None => kube::Client::try_default()
            .await
            .map_err(err("the in-cluster Kubernetes client (service account)")),
    }
}

/// Sets (`Some(value)`) or removes (`None`) the label on `node`.
pub fn set(node: &str, value: Option<&str>, api: Option<&str>) -> Result<(), DeployError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DeployError::Manager(format!("tokio: {e}")))?;
    rt.block_on(async {
        let nodes: Api<Node> = Api::all(client(api).await?);
        let current = nodes.get(node).await.map_err(err("get the node"))?;
        let has = current
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL))
            .map(String::as_str);
        if has == value {
            return Ok(());
        }
        let patch = serde_json::json!({ "metadata": { "labels": { LABEL: value } } });
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(err("label the node"))?;
        Ok(())
    })
}
