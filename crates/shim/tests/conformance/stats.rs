//! Stats, as a kubelet's summary reads them: ContainerStats and ListContainerStats (CPU that
//! grows under load, the memory working set, the writable layer), PodSandboxStats and
//! ListPodSandboxStats where this containerd serves them.

use super::*;

/// What a kubelet can tell from a container's stats.
#[derive(Debug, PartialEq)]
struct Seen {
    cpu_grows_under_load: bool,
    working_set_positive: bool,
    writable_layer_measured: bool,
    listed_in_the_pod: usize,
    pod_stats: Result<(bool, bool), tonic::Code>,
}

fn cpu_ns(s: &ContainerStats) -> u64 {
    s.cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn container_and_pod_stats_as_with_runc() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-stats", |_| {}).await;
        let busy = pod
            .start("busy", &["sh", "-c", "while :; do :; done"], |_| {})
            .await;
        let _idle = pod.start("idle", cri::IDLE, |_| {}).await;
        let stats = |c: &mut RuntimeServiceClient<Channel>, id: String| {
            let mut c = c.clone();
            async move {
                c.container_stats(ContainerStatsRequest { container_id: id })
                    .await
                    .expect("ContainerStats")
                    .into_inner()
                    .stats
                    .expect("stats")
            }
        };
        let first = stats(&mut pod.c, busy.clone()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let second = stats(&mut pod.c, busy.clone()).await;
        let listed = pod
            .c
            .list_container_stats(ListContainerStatsRequest {
                filter: Some(ContainerStatsFilter {
                    pod_sandbox_id: pod.id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListContainerStats")
            .into_inner()
            .stats
            .len();
        let pod_stats = pod
            .c
            .pod_sandbox_stats(PodSandboxStatsRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .map(|r| {
                let linux = r.into_inner().stats.and_then(|s| s.linux);
                (
                    linux.as_ref().is_some_and(|l| l.cpu.is_some()),
                    linux.as_ref().is_some_and(|l| l.memory.is_some()),
                )
            })
            .map_err(|s| s.code());
        pod.remove().await;
        Seen {
            // A busy loop for 2 s: at least half a CPU-second.
            cpu_grows_under_load: cpu_ns(&second).saturating_sub(cpu_ns(&first)) > 500_000_000,
            working_set_positive: second
                .memory
                .as_ref()
                .and_then(|m| m.working_set_bytes.as_ref())
                .is_some_and(|v| v.value > 0),
            writable_layer_measured: second.writable_layer.is_some(),
            listed_in_the_pod: listed,
            pod_stats,
        }
    })
    .await;
    let runc = &seen["runc"];
    assert!(
        runc.cpu_grows_under_load && runc.working_set_positive && runc.listed_in_the_pod == 2,
        "the oracle: {runc:?}"
    );
    assert_same("stats", &seen);
}
