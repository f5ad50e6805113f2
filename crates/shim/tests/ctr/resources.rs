//! CPU and memory: limits that grow the VM, quotas that hot-plug vCPUs, host cgroups, static
//! sizing, updates, the OOM killer.

use super::*;

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn memory_limit_grows_the_vm() {
    let (plain, _, c1) = run(KATA, "mem-plain", &[], "grep MemTotal /proc/meminfo", "");
    let (limited, _, c2) = run(
        KATA,
        "mem-limit",
        &["--memory-limit", "536870912"],
        "grep MemTotal /proc/meminfo",
        "",
    );
    assert_eq!((c1, c2), (0, 0));
    let (a, b) = (mem_total_mib(&plain), mem_total_mib(&limited));
    assert!(
        b >= a + 500 && b <= a + 520,
        "VM memory {a} MiB -> {b} MiB with a 512 MiB limit"
    );
    assert_no_leftovers("mem-limit");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn cpu_quota_hot_plugs_a_vcpu() {
    let (before, _, c1) = run(KATA, "cpus-plain", &[], "nproc", "");
    let (after, err, c2) = run(KATA, "cpus-one", &["--cpus", "1"], "nproc", "");
    assert_eq!((c1, c2), (0, 0), "{err}");
    let (b, a): (u32, u32) = (
        before.trim().parse().expect("nproc"),
        after.trim().parse().expect("nproc"),
    );
    let host = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    assert_eq!(a, (b + 1).min(host), "vCPUs {b} -> {a} with --cpus 1");
    assert_no_leftovers("cpus-one");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn host_cgroups_hold_vcpus_apart_from_the_overhead() {
    // The shipped sandbox_cgroup_only = false: the shim, virtiofsd and QEMU in
    // /kata_overhead/<id>; QEMU's vCPU threads in <cgroupsPath parent>/kata_<id> (ctr gives
    // /default/<id>), which carries the container's CPU limit.
    let id = "cgroups-kata";
    force_remove(id);
    run_detached(KATA, id, &["--cpus", "0.5"], &["sleep", "1000"]);
    let cpu = std::path::Path::new("/sys/fs/cgroup/cpu/default").join(format!("kata_{id}"));
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("sandbox cgroup");
    assert_eq!(quota.trim(), "50000", "--cpus 0.5 over a 100 ms period");
    let qemu = common::pid_with(&format!("sandbox-{id} ")).expect("QEMU runs");
    let shim = common::pid_with(&format!("-id {id} ")).expect("shim runs");
    let virtiofsd = common::virtiofsd_pids(id);
    assert_eq!(virtiofsd.len(), 2, "virtiofsd and its sandboxed worker");
    let tasks = common::cgroup_members(&cpu, "tasks");
    assert_eq!(tasks.len(), 2, "1 + 1 hot-plugged vCPU threads: {tasks:?}");
    for tid in &tasks {
        let tgid = std::fs::read_to_string(format!("/proc/{qemu}/task/{tid}/stat"));
        assert!(tgid.is_ok(), "thread {tid} is QEMU's");
    }
    let overhead = std::path::Path::new("/sys/fs/cgroup/memory/kata_overhead").join(id);
    let mut procs = common::cgroup_members(&overhead, "cgroup.procs");
    procs.sort_unstable();
    let mut want = vec![shim, qemu];
    want.extend(&virtiofsd);
    want.sort_unstable();
    assert_eq!(
        procs, want,
        "shim, virtiofsd and QEMU in the overhead cgroup"
    );
    // The guest still runs under the limit.
    let out = ctr(&["task", "exec", "--exec-id", "n", id, "nproc"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    kill_and_remove(id);
    assert_no_leftovers(id);
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn static_resources_size_the_vm_at_boot() {
    // static_sandbox_resource_mgmt: the container's limits are added to the VM at boot (QEMU's
    // -smp and -m), nothing is hot-plugged.
    let good =
        std::fs::read_to_string("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
            .expect("installed config");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("static.toml");
    std::fs::write(
        &cfg,
        good.replace(
            "static_sandbox_resource_mgmt = false",
            "static_sandbox_resource_mgmt = true",
        ),
    )
    .expect("write");
    let id = "static-kata";
    force_remove(id);
    let cfg_arg = cfg.display().to_string();
    run_detached(
        KATA,
        id,
        &[
            "--runtime-config-path",
            &cfg_arg,
            "--memory-limit",
            "536870912",
            "--cpus",
            "1",
        ],
        &["sleep", "1000"],
    );
    let qemu = common::pid_with(&format!("sandbox-{id} ")).expect("QEMU runs");
    let argv =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{qemu}/cmdline")).expect("cmdline"))
            .replace('\0', " ");
    assert!(argv.contains("-smp 2,"), "{argv}");
    assert!(argv.contains("-m 2560M"), "{argv}");
    let out = ctr(&["task", "exec", "--exec-id", "n", id, "nproc"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    kill_and_remove(id);
    assert_no_leftovers(id);
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn out_of_memory_matches_runc_and_is_published() {
    let hog = "x=0123456789abcdef; while true; do x=$x$x; done";
    // Watch containerd's events for the OOM of the Kata container.
    let mut events = Command::new("ctr")
        .arg("-a")
        .arg(socket())
        .args(["events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        let (_, _, code) = run(
            runtime,
            &format!("oom-{tag}"),
            &["--memory-limit", "33554432"],
            hog,
            "",
        );
        assert_eq!(code, 137, "{runtime}: the OOM killer ends the process");
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = events.kill();
    let out = events.wait_with_output().expect("events");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("oom-kata")),
        "no /tasks/oom event for oom-kata in:\n{text}"
    );
    assert_no_leftovers("oom-kata");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn task_update_resizes() {
    let id = "update-kata";
    force_remove(id);
    run_detached(
        KATA,
        id,
        &["--memory-limit", "134217728"],
        &["sleep", "1000"],
    );
    let mem = |tag: &str| {
        let e = ctr(&[
            "task",
            "exec",
            "--exec-id",
            tag,
            id,
            "sh",
            "-c",
            "grep MemTotal /proc/meminfo",
        ]);
        String::from_utf8_lossy(&e.stdout).to_string()
    };
    let before = mem("m1");
    // ctr 1.6 has no `task update`: call the shim's Update as containerd does.
    let address = std::fs::read_to_string(format!(
        "/run/kata-containerd/state/io.containerd.runtime.v2.task/default/{id}/address"
    ))
    .expect("address file");
    let client = containerd_shim_protos::TaskClient::new(
        ttrpc::Client::connect(address.trim()).expect("connect to the shim"),
    );
    let resources = protobuf::well_known_types::any::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
        value: br#"{"memory":{"limit":671088640}}"#.to_vec(),
        ..Default::default()
    };
    let req = containerd_shim_protos::api::UpdateTaskRequest {
        id: id.into(),
        resources: protobuf::MessageField::some(resources),
        ..Default::default()
    };
    client
        .update(ttrpc::context::with_timeout(60_000_000_000), &req)
        .expect("Update");
    let after = mem("m2");
    assert!(
        mem_total_mib(&after) >= mem_total_mib(&before) + 500,
        "the VM grew: {before} -> {after}"
    );
    kill_and_remove(id);
    assert_no_leftovers(id);
}
