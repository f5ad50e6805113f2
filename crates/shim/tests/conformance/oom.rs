//! OOM: a container over its memory limit is killed and reported `OOMKilled` with exit code
//! 137 (the kubelet's restart reason); the pod and its other containers keep running.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-oom", |_| {}).await;
        let calm = pod.start("calm", cri::IDLE, |_| {}).await;
        // `tail /dev/zero` keeps one ever-growing line: it allocates until it is killed.
        let hog = pod
            .start("hog", &["tail", "/dev/zero"], |c| {
                linux(c).resources = Some(limits(64, 1.0));
            })
            .await;
        let s = pod.wait_exited(&hog, Duration::from_secs(60)).await;
        let calm_state = ContainerState::try_from(pod.status(&calm).await.state);
        let (out, code) = pod.exec(&calm, &["echo", "still-here"]).await;
        pod.remove().await;
        (
            s.exit_code,
            s.reason,
            calm_state,
            out.trim().to_string(),
            code,
        )
    })
    .await;
    for (handler, observed) in &seen {
        assert_eq!(
            observed,
            &(
                137,
                "OOMKilled".to_string(),
                Ok(ContainerState::ContainerRunning),
                "still-here".to_string(),
                0
            ),
            "{handler}"
        );
    }
    assert_same("OOM", &seen);
}
