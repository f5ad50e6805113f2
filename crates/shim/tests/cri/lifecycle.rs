//! A pod's life through the CRI: its containers in one VM, exec, stop and remove.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_runs_its_containers_in_one_vm() {
    let mut c = client().await;
    let logs = logs_dir("pod1");
    remove_stale(&mut c, "kata-pod1").await;
    let cfg = pod_config("kata-pod1", &[], &logs);
    let volumes = tempfile::tempdir().expect("tmp");
    let empty_dir = volumes
        .path()
        .join("pods/uid-kata-pod1/volumes/kubernetes.io~empty-dir/cache");
    std::fs::create_dir_all(&empty_dir).expect("emptyDir");
    let t = Instant::now();
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let cache = || Mount {
        container_path: "/cache".into(),
        host_path: empty_dir.display().to_string(),
        ..Default::default()
    };
    let c1 = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("app", IDLE, vec![cache()]),
    )
    .await;
    let first = t.elapsed();
    let t = Instant::now();
    let c2 = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("sidecar", IDLE, vec![cache()]),
    )
    .await;
    let second = t.elapsed();
    eprintln!(
        "RunPodSandbox -> first container running: {} ms; second container create+start: {} ms",
        first.as_millis(),
        second.as_millis()
    );

    // An ExecSync of a binary that does not exist fails at once with the exec's own error (as
    // with runc), and the container is unharmed.
    let t = Instant::now();
    let missing = c
        .exec_sync(ExecSyncRequest {
            container_id: c1.clone(),
            cmd: vec!["/no/such/binary".into()],
            timeout: 30,
        })
        .await;
    let took = t.elapsed();
    match missing {
        Err(e) => assert!(e.message().contains("/no/such/binary"), "{}", e.message()),
        Ok(r) => panic!("a missing binary ran: exit {}", r.into_inner().exit_code),
    }
    assert!(took < Duration::from_millis(900), "the error took {took:?}");
    assert_eq!(exec(&mut c, &c1, &["true"]).await.1, 0);

    // One VM and one shim serve the pod.
    assert_eq!(
        common::processes_with(&format!("sandbox-{pod} ")).len(),
        1,
        "one QEMU"
    );
    assert_eq!(
        common::processes_with("containerd-shim-kata-v2")
            .iter()
            .filter(|c| c.contains(&format!("-id {pod} "))
                || c.contains(&format!("-id {c1} "))
                || c.contains(&format!("-id {c2} ")))
            .count(),
        1,
        "one shim"
    );
    // Both run on the guest kernel, share the pod's hostname, IPC and emptyDir.
    let guest = common::guest_kernel_release();
    for id in [&c1, &c2] {
        let (out, code) = exec(&mut c, id, &["uname", "-r"]).await;
        assert_eq!((out.trim(), code), (guest.as_str(), 0));
        let (out, _) = exec(&mut c, id, &["hostname"]).await;
        assert_eq!(out.trim(), "kata-pod1");
    }
    let (ipc1, _) = exec(&mut c, &c1, &["readlink", "/proc/self/ns/ipc"]).await;
    let (ipc2, _) = exec(&mut c, &c2, &["readlink", "/proc/self/ns/ipc"]).await;
    assert_eq!(ipc1, ipc2, "the pod's containers share an IPC namespace");
    let (_, code) = exec(&mut c, &c1, &["sh", "-c", "echo shared > /cache/note"]).await;
    assert_eq!(code, 0);
    let (out, _) = exec(&mut c, &c2, &["cat", "/cache/note"]).await;
    assert_eq!(
        out, "shared\n",
        "emptyDir shared between the pod's containers"
    );
    assert!(
        std::fs::read_dir(&empty_dir)
            .expect("host dir")
            .next()
            .is_none(),
        "the emptyDir lives in guest memory, not on the host"
    );
    let (out, code) = exec(&mut c, &c2, &["sh", "-c", "exit 7"]).await;
    assert_eq!(code, 7, "{out}");

    // Status and stats.
    let st = container_status(&mut c, &c1).await;
    assert_eq!(st.state(), ContainerState::ContainerRunning);
    let ps = pod_status(&mut c, &pod).await;
    assert_eq!(ps.state(), PodSandboxState::SandboxReady);
    let stats = c
        .container_stats(ContainerStatsRequest {
            container_id: c1.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(
        mem.unwrap_or(0) > 0,
        "memory working set from the guest: {mem:?}"
    );

    // Stop and remove the containers, then the pod.
    for id in [&c1, &c2] {
        stop_and_remove(&mut c, id).await;
    }
    assert_eq!(
        common::processes_with(&format!("sandbox-{pod} ")).len(),
        1,
        "the VM outlives its containers"
    );
    remove_pod(&mut c, &pod).await;
}
