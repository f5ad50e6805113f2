//! The CRI helpers of the shim's test binaries (cri.rs, soak.rs): containerd's CRI client, pods
//! and containers of the project's images, and what a pod leaves on the host.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

pub const IMAGE: &str = "kata.local/busybox:latest";
pub const PAUSE: &str = "kata.local/pause:3.6";
/// The guide's example pod's command: a container that idles.
pub const IDLE: &[&str] = &["tail", "-f", "/dev/null"];
pub const DEFAULT_CONFIG_DIR: &str = "/opt/kata/share/defaults/kata-containers";

/// Starts (or finds) containerd and imports the images into CRI's namespace, once.
pub fn socket() -> &'static str {
    static SOCKET: OnceLock<String> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let sock = super::containerd(&["start"]);
        let pause =
            r#"["/bin/sh","-c","trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]"#;
        super::import_image(&sock, "k8s.io", IMAGE, None);
        super::import_image(&sock, "k8s.io", PAUSE, Some(pause));
        sock
    })
}

/// Removes pods named `name` a failed earlier run left (CRI reserves names).
pub async fn remove_stale(c: &mut RuntimeServiceClient<Channel>, name: &str) {
    let pods = c
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    for p in pods {
        if p.metadata.as_ref().map(|m| m.name.as_str()) == Some(name) {
            let _ = c
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await;
            let _ = c
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: p.id,
                })
                .await;
        }
    }
}

pub async fn client() -> RuntimeServiceClient<Channel> {
    client_at(socket()).await
}

/// A CRI client of the containerd listening on `sock`.
pub async fn client_at(sock: &str) -> RuntimeServiceClient<Channel> {
    let path = sock.to_string();
    let channel = Endpoint::try_from("http://[::]")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .expect("connect to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

pub fn pod_config(name: &str, annotations: &[(&str, &str)], logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

pub fn container_config(name: &str, cmd: &[&str], mounts: Vec<Mount>) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        mounts,
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

pub fn assert_pod_gone(id: &str) {
    super::assert_sandbox_gone(id, Duration::from_secs(15));
}

pub async fn pod_status(c: &mut RuntimeServiceClient<Channel>, pod: &str) -> PodSandboxStatus {
    c.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
    .status
    .expect("status")
}

pub async fn container_status(c: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
    c.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

pub async fn exec(c: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &[&str]) -> (String, i32) {
    let r = c
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ),
        r.exit_code,
    )
}

/// Creates and starts a container in a pod; returns its id.
pub async fn start_container(
    c: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let id = c
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    c.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

/// RunPodSandbox with runtime handler "kata" (as a RuntimeClass selects it); the pod's id.
pub async fn run_pod(
    c: &mut RuntimeServiceClient<Channel>,
    config: &PodSandboxConfig,
) -> Result<String, tonic::Status> {
    run_pod_with(c, config, "kata").await
}

/// RunPodSandbox with runtime handler `handler` (`kata`, or containerd 2.x's
/// `kata-sandbox-api`, the same runtime through the sandbox API).
pub async fn run_pod_with(
    c: &mut RuntimeServiceClient<Channel>,
    config: &PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    Ok(c.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: handler.into(),
    })
    .await?
    .into_inner()
    .pod_sandbox_id)
}

pub async fn remove_pod(c: &mut RuntimeServiceClient<Channel>, pod: &str) {
    c.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("StopPodSandbox");
    c.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
    assert_pod_gone(pod);
}

/// StopContainer (2 s) then RemoveContainer.
pub async fn stop_and_remove(c: &mut RuntimeServiceClient<Channel>, id: &str) {
    c.stop_container(StopContainerRequest {
        container_id: id.to_string(),
        timeout: 2,
    })
    .await
    .expect("StopContainer");
    c.remove_container(RemoveContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .expect("RemoveContainer");
}

pub fn logs_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kata-cri-logs-{name}"));
    std::fs::create_dir_all(&d).expect("log dir");
    d
}

/// The pid of pod `pod`'s QEMU (named after the pod, or after the cached VM it took over).
pub fn qemu_of(pod: &str) -> u32 {
    let name = std::fs::read_to_string(format!("/run/vc/vm/{pod}/adopted-from"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| pod.to_string());
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            String::from_utf8_lossy(
                &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            )
            .contains(&format!("sandbox-{name}\0"))
        })
        .collect();
    assert_eq!(pids.len(), 1, "one QEMU for {pod}");
    pids[0]
}

/// The named network namespace (under /var/run/netns) that process `pid` is in: a pod's, where
/// its tap is. Its removal with the pod is checked by path, since other tests' pods may run
/// meanwhile.
pub fn named_netns_of(pid: u32) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|l| l.display().to_string())
        .unwrap_or_default();
    let named: Vec<PathBuf> = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| format!("net:[{}]", m.ino()))
                .ok()
                .as_deref()
                == Some(ns.as_str())
        })
        .collect();
    assert_eq!(
        named.len(),
        1,
        "the named network namespace of {pid} ({ns})"
    );
    named.into_iter().next().unwrap_or_default()
}

/// This runtime's taps in any named network namespace of the host.
pub fn taps_anywhere() -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let out = Command::new("ip")
            .args(["-n", &e.file_name().to_string_lossy(), "-o", "link"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        found.extend(
            out.lines()
                .filter(|l| l.contains("_kata"))
                .map(str::to_string),
        );
    }
    found
}

/// Runs `busybox wget` from network namespace `netns` (a containerd's, where its CNI bridge is),
/// bounded by `secs` seconds. Returns the body and the time it took.
pub fn fetch_in(netns: &str, url: &str, secs: u32) -> Result<(Vec<u8>, Duration), String> {
    let t = std::time::Instant::now();
    // (busybox wget's own -T crashes in Debian's busybox-static 1.35: bound it with timeout.)
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["/bin/busybox", "wget", "-q", "-O", "-", url])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((out.stdout, t.elapsed()))
}

/// [`fetch_in`] until `url` answers, for up to 60 s.
pub fn fetch_in_when_up(netns: &str, url: &str) -> Vec<u8> {
    let t = std::time::Instant::now();
    let deadline = t + Duration::from_secs(60);
    loop {
        match fetch_in(netns, url, 20) {
            Ok((body, _)) => {
                eprintln!("{url} answered after {:?}", t.elapsed());
                return body;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "{url} never answered: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
