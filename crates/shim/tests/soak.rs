//! The soak-and-fault suite: N cycles (KATA_SOAK_CYCLES; `make test` runs 10, `make soak` 100)
//! of `ctr run --rm` and of CRI pods with two containers and execs; every 10th cycle the faults
//! long-running nodes meet, each on a pod of its own: SIGKILL of QEMU, of virtiofsd and of the
//! shim, SIGSTOP of QEMU (a silent agent) and a containerd restart. Then a census of what is
//! left on the host. The summary goes to KATA_SOAK_OUT (JSON) when set. A test binary of its
//! own: it restarts containerd.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

mod common;
use common::cri::*;

const FAULTS: [&str; 5] = [
    "qemu-sigkill",
    "virtiofsd-sigkill",
    "shim-sigkill",
    "qemu-sigstop",
    "containerd-restart",
];

fn kill(signal: &str, pid: u32) {
    let st = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill {signal} {pid}");
}

/// The shim serving pod (or ctr container) `id`.
fn shim_of(id: &str) -> Option<u32> {
    common::pid_where(|cmd| {
        cmd.starts_with("/opt/kata/bin/containerd-shim-kata-v2")
            && cmd.contains(&format!(" -id {id} "))
    })
}

fn containerd_pid() -> u32 {
    std::fs::read_to_string("/run/kata-containerd/pid")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .expect("containerd's pid file")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Interfaces in the containerd's network namespace (the CNI bridge and the pods' veths).
fn bridge_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", "kata-containerd", "-o", "link"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect()
}

fn netns_count() -> usize {
    std::fs::read_dir("/var/run/netns")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One pod: two containers sharing it, two execs each, then stop and remove.
async fn pod_cycle(c: &mut RuntimeServiceClient<Channel>, name: &str) -> String {
    remove_stale(c, name).await;
    let cfg = pod_config(name, &[], &logs_dir(name));
    let pod = run_pod(c, &cfg).await.expect("RunPodSandbox");
    let mut ids = Vec::new();
    for n in ["app", "sidecar"] {
        ids.push(start_container(c, &pod, &cfg, container_config(n, IDLE, vec![])).await);
    }
    for id in &ids {
        assert_eq!(exec(c, id, &["echo", "soak"]).await, ("soak\n".into(), 0));
        assert_eq!(exec(c, id, &["sh", "-c", "exit 3"]).await.1, 3);
    }
    for id in &ids {
        stop_and_remove(c, id).await;
    }
    remove_pod(c, &pod).await;
    pod
}

fn ctr_cycle(sock: &str, id: &str) {
    let out = Command::new("ctr")
        .args([
            "-a",
            sock,
            "run",
            "--rm",
            "--runtime",
            "io.containerd.kata.v2",
            IMAGE,
            id,
        ])
        .args(["sh", "-c", "echo soak; exit 4"])
        .stdin(Stdio::null())
        .output()
        .expect("ctr run");
    assert_eq!(
        (
            String::from_utf8_lossy(&out.stdout).as_ref(),
            out.status.code()
        ),
        ("soak\n", Some(4)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod with a running container meets `fault`; then the kubelet stops and removes it, which
/// must succeed and leave nothing.
async fn fault_cycle(c: &mut RuntimeServiceClient<Channel>, name: &str, fault: &str) -> String {
    remove_stale(c, name).await;
    let cfg = pod_config(name, &[], &logs_dir(name));
    let pod = run_pod(c, &cfg).await.expect("RunPodSandbox");
    let id = start_container(c, &pod, &cfg, container_config("app", IDLE, vec![])).await;
    assert_eq!(exec(c, &id, &["true"]).await.1, 0);
    let mut client = c.clone();
    match fault {
        "qemu-sigkill" => kill("-KILL", qemu_of(&pod)),
        "virtiofsd-sigkill" => {
            for pid in common::virtiofsd_pids(&pod) {
                kill("-KILL", pid);
            }
        }
        "shim-sigkill" => kill("-KILL", shim_of(&pod).expect("the pod's shim")),
        "qemu-sigstop" => kill("-STOP", qemu_of(&pod)),
        "containerd-restart" => {
            kill("-TERM", containerd_pid());
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::path::Path::new(&format!("/proc/{}", containerd_pid())).exists() {
                assert!(Instant::now() < deadline, "containerd did not stop");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            common::containerd(&["start"]);
            client = client_fresh().await;
            // The pod still runs after the restart: containerd reconnected to its shim.
            assert_eq!(
                exec(&mut client, &id, &["echo", "back"]).await,
                ("back\n".into(), 0)
            );
        }
        other => panic!("unknown fault {other}"),
    }
    let t = Instant::now();
    let stop = client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    assert!(stop.is_ok(), "{fault}: StopPodSandbox: {stop:?}");
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{fault}: RemovePodSandbox: {e}"));
    eprintln!("{fault}: pod stopped and removed in {:?}", t.elapsed());
    *c = client;
    pod
}

/// A new CRI connection (after containerd restarted).
async fn client_fresh() -> RuntimeServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = client().await;
        if c.version(VersionRequest::default()).await.is_ok() {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "containerd's CRI did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn soak_cycles_with_faults_leave_nothing_behind() {
    let cycles: u32 = std::env::var("KATA_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let sock = socket().to_string();
    common::import_image(&sock, "default", IMAGE, None);
    let mut c = client().await;
    // Warm up once, then take the baseline.
    pod_cycle(&mut c, "soak-warmup").await;
    let fds_before = fds(containerd_pid());
    let links_before = bridge_links();
    let netns_before = netns_count();
    let t = Instant::now();
    let mut ids: Vec<String> = Vec::new();
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    for i in 0..cycles {
        let id = format!("soak-ctr-{i}");
        ctr_cycle(&sock, &id);
        ids.push(id);
        ids.push(pod_cycle(&mut c, &format!("soak-pod-{i}")).await);
        if i % 10 == 9 {
            for f in FAULTS {
                ids.push(fault_cycle(&mut c, &format!("soak-{f}-{i}"), f).await);
                *faults.entry(f).or_default() += 1;
            }
        }
    }
    let took = t.elapsed();
    // The census.
    let mut leaks: Vec<String> = Vec::new();
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = common::sandbox_leftovers(id);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                leaks.extend(left.into_iter().map(|l| format!("{id}: {l}")));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if shim_of(id).is_some() {
            leaks.push(format!("{id}: its shim still runs"));
        }
    }
    leaks.extend(taps_anywhere().into_iter().map(|t| format!("tap: {t}")));
    let links_after = bridge_links();
    leaks.extend(
        links_after
            .iter()
            .filter(|l| !links_before.contains(l))
            .map(|l| format!("interface in the CNI namespace: {l}")),
    );
    let netns_after = netns_count();
    if netns_after > netns_before {
        leaks.push(format!(
            "network namespaces: {netns_before} -> {netns_after}"
        ));
    }
    let fds_after = fds(containerd_pid());
    // containerd caches a few descriptors per namespace and plugin; a leak grows with the cycles.
    if fds_after > fds_before + 16 {
        leaks.push(format!(
            "containerd's descriptors: {fds_before} -> {fds_after}"
        ));
    }
    let fault_total: u32 = faults.values().sum();
    let summary = serde_json::json!({
        "cycles": cycles,
        "ctr_runs": cycles,
        "pods": cycles,
        "faults": faults,
        "faults_injected": fault_total,
        "seconds": took.as_secs(),
        "containerd_fds": {"before": fds_before, "after": fds_after},
        "leaks": leaks,
    });
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    if let Ok(out) = std::env::var("KATA_SOAK_OUT") {
        std::fs::write(
            &out,
            format!(
                "{}\n",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            ),
        )
        .expect("write the soak summary");
    }
    assert!(leaks.is_empty(), "left behind: {leaks:#?}");
}
