//! Kubernetes pods through containerd's CRI plugin, with this test as the kubelet (a CRI client
//! over containerd's socket, runtime handler "kata" as a RuntimeClass would select it). Needs
//! root, containerd, QEMU, the CNI plugins and `make install` (make test provides all of them).

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[path = "../common/mod.rs"]
mod common;

use common::cri::*;

/// Serializes the tests that change the default configuration's drop-ins.
async fn config_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

fn write_drop_in(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(DEFAULT_CONFIG_DIR).join("config.d");
    std::fs::create_dir_all(&dir).expect("config.d");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("drop-in");
    p
}

/// Runs `busybox wget` from containerd's network namespace (where the CNI bridge is): another
/// namespace than the pod's. Returns the body and the time it took.
fn fetch(url: &str) -> Result<(Vec<u8>, Duration), String> {
    fetch_within(url, 20)
}

/// [`fetch`] bounded by `secs` seconds.
fn fetch_within(url: &str, secs: u32) -> Result<(Vec<u8>, Duration), String> {
    fetch_in("kata-containerd", url, secs)
}

fn fetch_when_up(url: &str) -> Vec<u8> {
    fetch_in_when_up("kata-containerd", url)
}

async fn web_pod(
    c: &mut RuntimeServiceClient<Channel>,
    name: &str,
    annotations: &[(&str, &str)],
) -> (String, String) {
    remove_stale(c, name).await;
    let cfg = pod_config(name, annotations, &logs_dir(name));
    let pod = run_pod(c, &cfg).await.expect("RunPodSandbox");
    let script = "mkdir -p /www && head -c 1048576 /dev/zero > /www/blob && echo hello-from-kata > /www/index.html && exec httpd -f -p 8080 -h /www";
    start_container(
        c,
        &pod,
        &cfg,
        container_config("web", &["sh", "-c", script], vec![]),
    )
    .await;
    let ip = pod_status(c, &pod)
        .await
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(
        ip.starts_with("198.51.100."),
        "pod IP from the project's CNI config: {ip:?}"
    );
    (pod, ip)
}

/// A second container to look around the pod with.
async fn start_probe(c: &mut RuntimeServiceClient<Channel>, pod: &str) -> String {
    let name = pod_status(c, pod)
        .await
        .metadata
        .map(|m| m.name)
        .unwrap_or_default();
    let cfg = pod_config(&name, &[], &logs_dir(&name));
    start_container(c, pod, &cfg, container_config("probe", IDLE, vec![])).await
}

/// Serves a 1 MiB file from containerd's network namespace (the CNI bridge's address) until
/// dropped: traffic into a pod's VM.
struct BridgeServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl BridgeServer {
    const URL: &'static str = "http://198.51.100.1:8089/blob";

    fn start() -> BridgeServer {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("blob"), vec![0u8; 1 << 20]).expect("blob");
        let child = Command::new("nsenter")
            .args([
                "--net=/run/netns/kata-containerd",
                "/bin/busybox",
                "httpd",
                "-f",
            ])
            // Every address of that namespace: the bridge may not exist before the first pod.
            .args(["-p", "8089", "-h"])
            .arg(dir.path())
            .spawn()
            .expect("httpd");
        let mut server = BridgeServer { child, _dir: dir };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            matches!(server.child.try_wait(), Ok(None)),
            "the bridge-side httpd exited at once"
        );
        server
    }
}

impl Drop for BridgeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Downloads the bridge server's file from inside container `id`; returns how long it took.
async fn download_into(c: &mut RuntimeServiceClient<Channel>, id: &str) -> Duration {
    let t = Instant::now();
    let (out, code) = exec(
        c,
        id,
        &[
            "sh",
            "-c",
            &format!("wget -q -O - {} | wc -c", BridgeServer::URL),
        ],
    )
    .await;
    assert_eq!((out.trim(), code), ("1048576", 0), "download into the VM");
    t.elapsed()
}

/// A process the test started, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

mod configuration;
mod factory;
mod guest;
mod lifecycle;
mod mounts;
mod network;
mod observability;
mod resources;
mod security;
