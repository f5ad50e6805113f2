//! The pod's configuration: annotations the guide uses, refused handlers and annotations.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn the_guides_vcpu_annotation_needs_enable_annotations() {
    let mut c = client().await;
    let logs = logs_dir("vcpus");
    let annotations = [("io.katacontainers.config.hypervisor.default_vcpus", "5")];
    let _lock = config_lock().await;
    remove_stale(&mut c, "kata-vcpus").await;
    remove_stale(&mut c, "kata-vcpus-refused").await;
    // Refused with the shipped configuration: a clear CRI error, nothing left.
    let before = common::processes_with("qemu-system").len();
    let err = run_pod(
        &mut c,
        &pod_config("kata-vcpus-refused", &annotations, &logs),
    )
    .await
    .expect_err("refused annotation");
    assert!(
        err.message().contains("enable_annotations") && err.message().contains("default_vcpus"),
        "{}",
        err.message()
    );
    // (Other tests may stop their pods meanwhile: the count must not have grown.)
    let after = common::processes_with("qemu-system").len();
    assert!(
        after <= before,
        "no QEMU left: {before} before, {after} after"
    );

    // Allowed by a drop-in, as the guide does in configuration.toml: nproc = 5 in the guest.
    let drop_in = write_drop_in(
        "90-test-vcpus.toml",
        "[hypervisor.qemu]\nenable_annotations = [\"default_vcpus\"]\n",
    );
    let cfg = pod_config("kata-vcpus", &annotations, &logs);
    let pod = run_pod(&mut c, &cfg).await;
    let _ = std::fs::remove_file(&drop_in);
    let pod = pod.expect("RunPodSandbox with default_vcpus = 5");
    let id = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("busybox", IDLE, vec![]),
    )
    .await;
    let (out, code) = exec(&mut c, &id, &["nproc"]).await;
    assert_eq!((out.trim(), code), ("5", 0));
    remove_pod(&mut c, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn an_unknown_runtime_handler_is_a_clear_error() {
    let mut c = client().await;
    let logs = logs_dir("handler");
    let err = c
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("kata-nohandler", &[], &logs)),
            runtime_handler: "kata-nope".into(),
        })
        .await
        .expect_err("unknown handler");
    assert!(err.message().contains("kata-nope"), "{}", err.message());
    let listed = c
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(
        !listed
            .iter()
            .any(|p| p.metadata.as_ref().map(|m| m.name.as_str()) == Some("kata-nohandler")),
        "no pod left"
    );
}
