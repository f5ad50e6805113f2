//! Security: the pod's sysctls in its containers.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn pod_sysctls_reach_the_containers() {
    let mut c = client().await;
    let _lock = config_lock().await;
    let name = "kata-sysctl";
    remove_stale(&mut c, name).await;
    let mut cfg = pod_config(name, &[], &logs_dir(name));
    cfg.linux = Some(LinuxPodSandboxConfig {
        sysctls: [
            ("net.ipv4.ip_unprivileged_port_start", "1000"),
            ("kernel.shm_rmid_forced", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    });
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let id = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("busybox", IDLE, vec![]),
    )
    .await;
    let (out, code) = exec(
        &mut c,
        &id,
        &[
            "cat",
            "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            "/proc/sys/kernel/shm_rmid_forced",
        ],
    )
    .await;
    assert_eq!((out.as_str(), code), ("1000\n1\n", 0));
    remove_pod(&mut c, &pod).await;
}
