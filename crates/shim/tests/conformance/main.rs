//! What a kubelet relies on, checked as cri-tools' critest checks it (its `pkg/validate` groups),
//! through containerd's CRI plugin with the `kata` handler and, as the oracle, the `runc`
//! handler: each check observes a value in both and asserts the same result.
//! Needs root, containerd, QEMU and `make install` (make test provides all of them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

#[path = "../common/mod.rs"]
mod common;
use common::cri;

mod configmap;
mod lifecycle;
mod logs;
mod oom;
mod resize;
mod security;
mod stats;
mod streaming;
mod volumes;

/// The runtime handlers compared: the oracle first.
const HANDLERS: [&str; 2] = ["runc", "kata"];

/// The suite's static helpers (`helpers/NAME.c`).
const HELPERS: &[&str] = &["inotify-watch"];

/// The busybox image with the suite's static helpers (`helpers/*.c`, built here with
/// `gcc -static`) in `/bin`, imported into CRI's namespace once; its reference.
fn tools_image() -> String {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let reference = "kata.local/busybox-tools:latest";
            let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/helpers");
            let out = std::env::temp_dir()
                .join(format!("kata-conformance-helpers-{}", std::process::id()));
            std::fs::create_dir_all(&out).expect("helpers dir");
            let mut files = Vec::new();
            for name in HELPERS {
                let bin = out.join(name);
                let st = std::process::Command::new("gcc")
                    .args(["-static", "-O2", "-Wall", "-o"])
                    .arg(&bin)
                    .arg(src.join(format!("{name}.c")))
                    .status()
                    .expect("gcc (scripts/install-deps.sh installs it)");
                assert!(st.success(), "build {name}");
                files.push((bin, format!("bin/{name}")));
            }
            let refs: Vec<(&std::path::Path, &str)> = files
                .iter()
                .map(|(h, i)| (h.as_path(), i.as_str()))
                .collect();
            common::import_image_with_files(cri::socket(), "k8s.io", reference, &refs);
            let _ = std::fs::remove_dir_all(&out);
            reference.to_string()
        })
        .clone()
}

/// A pod of one handler, and the containers started in it.
struct Pod {
    c: RuntimeServiceClient<Channel>,
    id: String,
    config: PodSandboxConfig,
    handler: &'static str,
    logs: PathBuf,
}

impl Pod {
    /// Runs pod `name` (suffixed with the handler) with `handler`; `tweak` adjusts its config.
    async fn run(
        handler: &'static str,
        name: &str,
        tweak: impl FnOnce(&mut PodSandboxConfig),
    ) -> Pod {
        let mut c = cri::client().await;
        let name = format!("{name}-{handler}");
        cri::remove_stale(&mut c, &name).await;
        let logs = cri::logs_dir(&name);
        // A log file of an earlier run would be appended to.
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).expect("logs dir");
        let mut config = cri::pod_config(&name, &[], &logs);
        tweak(&mut config);
        let id = cri::run_pod_with(&mut c, &config, handler)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name} with {handler}: {e}"));
        Pod {
            c,
            id,
            config,
            handler,
            logs,
        }
    }

    /// Creates and starts container `name` running `cmd`; `tweak` adjusts its config.
    async fn start(
        &mut self,
        name: &str,
        cmd: &[&str],
        tweak: impl FnOnce(&mut ContainerConfig),
    ) -> String {
        let id = self.create(name, cmd, tweak).await;
        self.c
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{}: StartContainer {name}: {e}", self.handler));
        id
    }

    /// Creates container `name` running `cmd` (not started).
    async fn create(
        &mut self,
        name: &str,
        cmd: &[&str],
        tweak: impl FnOnce(&mut ContainerConfig),
    ) -> String {
        let mut config = cri::container_config(name, cmd, Vec::new());
        tweak(&mut config);
        self.c
            .create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("{}: CreateContainer {name}: {e}", self.handler))
            .into_inner()
            .container_id
    }

    /// ExecSync: the output (stdout then stderr) and the exit code.
    async fn exec(&mut self, id: &str, cmd: &[&str]) -> (String, i32) {
        cri::exec(&mut self.c, id, cmd).await
    }

    /// The trimmed stdout of `sh -c script` in container `id`, which must succeed.
    async fn sh(&mut self, id: &str, script: &str) -> String {
        let (out, code) = self.exec(id, &["sh", "-c", script]).await;
        assert_eq!(code, 0, "{}: `{script}` failed: {out}", self.handler);
        out.trim().to_string()
    }

    async fn status(&mut self, id: &str) -> ContainerStatus {
        cri::container_status(&mut self.c, id).await
    }

    /// Waits until container `id` has exited (at most `within`); its status.
    async fn wait_exited(&mut self, id: &str, within: Duration) -> ContainerStatus {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status(id).await;
            if s.state == ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{}: container {id} still {:?} after {within:?}",
                self.handler,
                ContainerState::try_from(s.state)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops and removes the pod; nothing of it is left.
    async fn remove(mut self) {
        cri::remove_pod(&mut self.c, &self.id).await;
    }
}

/// Runs `scenario` in each handler (the oracle first) and returns what each observed.
async fn each_handler<T, F, Fut>(scenario: F) -> BTreeMap<&'static str, T>
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut seen = BTreeMap::new();
    for handler in HANDLERS {
        seen.insert(handler, scenario(handler).await);
    }
    seen
}

/// Asserts that kata observed what runc observed.
fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, seen: &BTreeMap<&'static str, T>) {
    assert_eq!(
        seen.get("kata"),
        seen.get("runc"),
        "{what}: kata and runc differ"
    );
}

/// A container's resources: `memory_mib` and `cpus` (quota over a 100 ms period).
fn limits(memory_mib: i64, cpus: f64) -> LinuxContainerResources {
    LinuxContainerResources {
        memory_limit_in_bytes: memory_mib * 1024 * 1024,
        cpu_period: 100_000,
        cpu_quota: (cpus * 100_000.0) as i64,
        cpu_shares: (cpus * 1024.0) as i64,
        ..Default::default()
    }
}

/// A pod config tweak: a privileged pod (CRI allows a privileged container only in one).
fn privileged_pod(p: &mut PodSandboxConfig) {
    p.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
}

/// The container's Linux settings, made if absent.
fn linux(c: &mut ContainerConfig) -> &mut LinuxContainerConfig {
    c.linux.get_or_insert_with(Default::default)
}

/// The container's security context, made if absent.
fn security(c: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    linux(c)
        .security_context
        .get_or_insert_with(Default::default)
}
