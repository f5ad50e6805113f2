//! In-place resize (`UpdateContainerResources`): a running container's memory limit and CPU
//! quota raised and lowered; the container's cgroup says so, and kata's VM grows for it and
//! gives back when lowered. A request the VM cannot meet fails with the reason, changing nothing.

use super::*;

/// The container's memory limit and CPU quota/period as its cgroup says (v2 in the guest, v1
/// or v2 on the host): "LIMIT QUOTA PERIOD".
const LIMITS: &str = "if [ -f /sys/fs/cgroup/memory.max ]; then \
      echo $(cat /sys/fs/cgroup/memory.max) $(cat /sys/fs/cgroup/cpu.max); \
    else \
      echo $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes) $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); \
    fi";

async fn update(pod: &mut Pod, id: &str, memory_mib: i64, cpus: f64) -> Result<(), tonic::Status> {
    pod.c
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(limits(memory_mib, cpus)),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn mem_total_mib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn update_container_resources_raises_and_lowers_limits() {
    let mut vm_sizes = BTreeMap::new();
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-resize", |_| {}).await;
        let app = pod
            .start("app", cri::IDLE, |c| {
                linux(c).resources = Some(limits(128, 0.5));
            })
            .await;
        let mut steps = vec![pod.sh(&app, LIMITS).await];
        let mut mem = vec![mem_total_mib(&pod.sh(&app, "cat /proc/meminfo").await)];
        update(&mut pod, &app, 1024, 1.0).await.expect("raise");
        steps.push(pod.sh(&app, LIMITS).await);
        mem.push(mem_total_mib(&pod.sh(&app, "cat /proc/meminfo").await));
        update(&mut pod, &app, 64, 0.5).await.expect("lower");
        steps.push(pod.sh(&app, LIMITS).await);
        mem.push(mem_total_mib(&pod.sh(&app, "cat /proc/meminfo").await));
        pod.remove().await;
        (steps, mem)
    })
    .await;
    let mut limits_seen = BTreeMap::new();
    for (handler, (steps, mem)) in seen {
        limits_seen.insert(handler, steps);
        vm_sizes.insert(handler, mem);
    }
    assert_eq!(
        limits_seen["runc"],
        vec![
            "134217728 50000 100000".to_string(),
            "1073741824 100000 100000".to_string(),
            "67108864 50000 100000".to_string()
        ],
        "the oracle"
    );
    assert_same("the container's cgroup limits", &limits_seen);
    // kata's VM: grown for the raised limit, back to its size when lowered.
    let kata = &vm_sizes["kata"];
    assert!(
        kata[1] >= kata[0] + 800 && kata[2] < kata[1],
        "the VM's MemTotal (MiB) at 128 MiB, 1024 MiB and 64 MiB limits: {kata:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_resize_the_vm_cannot_meet_fails_and_changes_nothing() {
    let mut pod = Pod::run("kata", "cf-resize-refused", |_| {}).await;
    let app = pod
        .start("app", cri::IDLE, |c| {
            linux(c).resources = Some(limits(128, 0.5));
        })
        .await;
    let before = pod.sh(&app, LIMITS).await;
    // More memory than [hypervisor.qemu] default_maxmemory allows: refused with the reason.
    let e = update(&mut pod, &app, 1024 * 1024, 1.0)
        .await
        .expect_err("a resize beyond the VM's maximum");
    assert!(
        e.message().contains("default_maxmemory") || e.message().contains("maxmemory"),
        "{e:?}"
    );
    assert_eq!(pod.sh(&app, LIMITS).await, before, "the limits changed");
    pod.remove().await;
}
