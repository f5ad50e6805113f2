//! Resources: host cgroups as sandbox_cgroup_only says, and what a removed container gives back.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn host_cgroups_follow_sandbox_cgroup_only() {
    let mut c = client().await;
    let _lock = config_lock().await;
    remove_stale(&mut c, "kata-cgroup").await;
    // The kubelet's part: the pod cgroup, limited to the pod's needs plus its overhead.
    let parent = "kubepods-kata-test/pod-uid-kata-cgroup";
    let memory = Path::new("/sys/fs/cgroup/memory").join(parent);
    std::fs::create_dir_all(&memory).expect("pod cgroup");
    std::fs::write(memory.join("memory.limit_in_bytes"), "3221225472").expect("limit");
    let drop_in = write_drop_in(
        "90-test-cgroup.toml",
        "[runtime]\nsandbox_cgroup_only = true\n",
    );
    let mut cfg = pod_config("kata-cgroup", &[], &logs_dir("cgroup"));
    cfg.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: format!("/{parent}"),
        ..Default::default()
    });
    let pod = run_pod(&mut c, &cfg).await;
    let _ = std::fs::remove_file(&drop_in);
    let pod = pod.expect("RunPodSandbox");
    let id = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("busybox", IDLE, vec![]),
    )
    .await;
    let (out, code) = exec(&mut c, &id, &["true"]).await;
    assert_eq!(code, 0, "{out}");

    let qemu = qemu_of(&pod);
    let shim = common::pid_with(&format!("-id {pod}")).expect("the pod's shim");
    let virtiofsd = common::virtiofsd_pids(&pod);
    assert_eq!(virtiofsd.len(), 2, "virtiofsd and its sandboxed worker");
    let mut want = vec![shim, qemu];
    want.extend(&virtiofsd);
    want.sort_unstable();
    let sandbox = memory.join(format!("kata_{pod}"));
    let mut procs = common::cgroup_members(&sandbox, "cgroup.procs");
    procs.sort_unstable();
    assert_eq!(
        procs, want,
        "shim, virtiofsd and QEMU in the sandbox cgroup"
    );
    // All of QEMU's threads, vCPUs included, are there in every controller.
    let cpu = Path::new("/sys/fs/cgroup/cpu")
        .join(parent)
        .join(format!("kata_{pod}"));
    let threads = std::fs::read_dir(format!("/proc/{qemu}/task"))
        .expect("QEMU threads")
        .count();
    let tasks = common::cgroup_members(&cpu, "tasks");
    assert!(tasks.len() >= threads, "{tasks:?}");
    assert!(common::sandbox_cgroups(&pod)
        .iter()
        .all(|d| !d.to_string_lossy().contains("kata_overhead")));
    // The runtime sets no limit of its own; the pod cgroup counts the whole VM.
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("quota");
    assert_eq!(quota.trim(), "-1");
    let usage: u64 = std::fs::read_to_string(memory.join("memory.usage_in_bytes"))
        .expect("usage")
        .trim()
        .parse()
        .expect("number");
    assert!(
        usage > 64 << 20,
        "the pod cgroup is charged for the VM's memory: {usage} bytes"
    );

    remove_pod(&mut c, &pod).await;
    assert!(memory.exists(), "the pod cgroup is the kubelet's: it stays");

    // The shipped layout (sandbox_cgroup_only = false): the vCPU threads' cgroup under the pod
    // cgroup carries the sum of the application containers' CPU limits (the pause container
    // has none and does not count).
    remove_stale(&mut c, "kata-cgroup").await;
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let cpu = Path::new("/sys/fs/cgroup/cpu")
        .join(parent)
        .join(format!("kata_{pod}"));
    let quota = || {
        std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
            .expect("quota")
            .trim()
            .to_string()
    };
    assert_eq!(quota(), "-1", "no container yet");
    for (name, quota_us) in [("half", 50_000), ("quarter", 25_000)] {
        let mut cc = container_config(name, IDLE, vec![]);
        cc.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: quota_us,
                ..Default::default()
            }),
            ..Default::default()
        });
        start_container(&mut c, &pod, &cfg, cc).await;
    }
    assert_eq!(quota(), "75000", "0.5 + 0.25 CPU");
    let vcpus = common::cgroup_members(&cpu, "tasks");
    assert!(!vcpus.is_empty(), "vCPU threads in the sandbox cgroup");
    let overhead = Path::new("/sys/fs/cgroup/memory/kata_overhead").join(&pod);
    assert!(
        common::cgroup_members(&overhead, "cgroup.procs").contains(&qemu_of(&pod)),
        "QEMU itself in the overhead cgroup"
    );
    remove_pod(&mut c, &pod).await;
    // The pod cgroup is the kubelet's and stays; remove it as the kubelet would.
    for h in ["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio"] {
        let top = Path::new("/sys/fs/cgroup").join(h);
        let _ = std::fs::remove_dir(top.join(parent));
        let _ = std::fs::remove_dir(top.join("kubepods-kata-test"));
    }
}

/// Host PSS of a process in KiB (smaps_rollup).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// QEMU's PSS once the guest has handed back what it freed (KiB): free page reporting returns
/// freed guest pages to the host in batches, about 2 s after they are freed, so a single sample
/// taken right after a removal may still hold them. The least of samples over 6 s.
async fn settled_pss_kib(pid: u32) -> u64 {
    let mut least = pss_kib(pid);
    for _ in 0..12 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        least = least.min(pss_kib(pid));
    }
    least
}

/// Host PSS of a process by mapping (KiB): a file's path, or `[anon N MiB]` by the mapping's
/// size for anonymous memory (the guest's RAM is one large anonymous or memfd mapping, QEMU's
/// heap and TCG cache are others).
fn pss_by_mapping(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            let path: Vec<&str> = f.skip(4).collect();
            current = if path.is_empty() {
                format!("[anon {} MiB]", size >> 20)
            } else {
                path.join(" ")
            };
        } else if first == "Pss:" {
            let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *out.entry(current.clone()).or_insert(0) += kib;
        }
    }
    out
}

/// The mappings whose PSS grew the most between two [`pss_by_mapping`] samples.
fn growth(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut d: Vec<(i64, &String)> = after
        .iter()
        .map(|(k, v)| (*v as i64 - *before.get(k).unwrap_or(&0) as i64, k))
        .filter(|(d, _)| *d != 0)
        .collect();
    d.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
    d.iter()
        .take(6)
        .map(|(d, k)| format!("{k}: {d:+} KiB"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pod's container with a memory limit and a CPU limit is created and removed `cycles` times;
/// each time the VM grows by the limits and comes back to its boot size (vCPUs and MemTotal in
/// the guest), and QEMU's host PSS does not creep. Returns QEMU's PSS after the first and the
/// last removal (KiB).
async fn resources_come_back(pod_name: &str, cycles: u32) -> (u64, u64, String) {
    let mut c = client().await;
    remove_stale(&mut c, pod_name).await;
    let cfg = pod_config(pod_name, &[], &logs_dir(pod_name));
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let probe = start_probe(&mut c, &pod).await;
    let guest = |c: &mut RuntimeServiceClient<Channel>| {
        let probe = probe.clone();
        let mut c = c.clone();
        async move {
            let (out, code) = exec(
                &mut c,
                &probe,
                &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"],
            )
            .await;
            assert_eq!(code, 0, "{out}");
            let mut lines = out.lines();
            let cpus: u32 = lines
                .next()
                .and_then(|l| l.trim().parse().ok())
                .expect("nproc");
            let mem: u64 = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .expect("MemTotal");
            (cpus, mem)
        }
    };
    let base = guest(&mut c).await;
    let qemu = qemu_of(&pod);
    // The vCPU goes back after each container: unplugged under KVM, offlined under TCG (where
    // the VM's vCPUs are present from boot and parked).
    let cpus_after = base.0;
    let mut first_pss = 0;
    let mut first_maps = Default::default();
    for i in 0..cycles {
        let mut cc = container_config(&format!("limited-{i}"), IDLE, vec![]);
        cc.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 100_000,
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = start_container(&mut c, &pod, &cfg, cc).await;
        // The container uses memory (a 30 MB shell variable), so pages were really handed out
        // and must really come back.
        let (out, code) = exec(
            &mut c,
            &id,
            &[
                "sh",
                "-c",
                "x=$(head -c 30000000 /dev/zero | tr '\\0' a); echo ${#x}",
            ],
        )
        .await;
        assert_eq!((out.trim(), code), ("30000000", 0), "cycle {i}");
        let (cpus, mem) = guest(&mut c).await;
        assert_eq!(cpus, base.0 + 1, "cycle {i}: one more vCPU");
        assert!(
            mem >= base.1 + 250 * 1024,
            "cycle {i}: {} -> {mem} KiB",
            base.1
        );
        stop_and_remove(&mut c, &id).await;
        assert_eq!(
            guest(&mut c).await,
            (cpus_after, base.1),
            "cycle {i}: back to the boot size"
        );
        if i == 0 {
            first_pss = settled_pss_kib(qemu).await;
            first_maps = pss_by_mapping(qemu);
        }
    }
    let last_pss = settled_pss_kib(qemu).await;
    let grew = growth(&first_maps, &pss_by_mapping(qemu));
    eprintln!("{pod_name}: QEMU PSS {first_pss} -> {last_pss} KiB; grew most: {grew}");
    remove_pod(&mut c, &pod).await;
    (first_pss, last_pss, grew)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_removed_containers_vcpus_and_memory_go_back() {
    let _lock = config_lock().await;
    let cycles = std::env::var("KATA_TEST_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // DIMMs (the default), then virtio-mem.
    let dimms = resources_come_back("kata-give-back", cycles).await;
    /// Removes the drop-in however the test ends.
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let drop_in = Removed(write_drop_in(
        "90-test-virtio-mem.toml",
        "[hypervisor.qemu]\nenable_virtio_mem = true\n",
    ));
    let vmem_cycles = cycles.div_ceil(5);
    let vmem = resources_come_back("kata-give-back-vmem", vmem_cycles).await;
    drop(drop_in);
    // `make soak` keeps the figures (BENCHMARKS.md).
    if let Ok(out) = std::env::var("KATA_GIVE_BACK_OUT") {
        let entry = |(first, last, grew): &(u64, u64, String), n: u32| serde_json::json!({ "cycles": n, "first_pss_kib": first, "last_pss_kib": last, "grew_most": grew });
        let json = serde_json::json!({
            "dimms": entry(&dimms, cycles),
            "virtio_mem": entry(&vmem, vmem_cycles),
        });
        std::fs::write(&out, format!("{json:#}\n")).expect("write the give-back figures");
    }
    for (what, (first, last, grew)) in [("DIMMs", &dimms), ("virtio-mem", &vmem)] {
        assert!(
            *last <= first + first / 10,
            "{what}: QEMU's PSS crept from {first} to {last} KiB ({grew})"
        );
    }
}
