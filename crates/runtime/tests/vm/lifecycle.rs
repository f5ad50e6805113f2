//! A sandbox's life: containers end to end, OCI process and filesystem semantics, streams,
//! reconnection.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn sandbox_runs_containers_end_to_end() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    let id = "it-e2e";
    kata_sandbox::sandbox::cleanup_stale(id);
    let t = Instant::now();
    let mut cfg = config(&[]);
    cfg.agent.enable_debug = true;
    let sb = Sandbox::create(id, &cfg).await.expect("sandbox boots");
    eprintln!(
        "sandbox ready in {:?} ({:?}, accel {:?})",
        t.elapsed(),
        sb.timings(),
        sb.accel()
    );

    // stdout, stderr and the exit code of a process.
    let pid = sb
        .create_container(
            "c1",
            spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            &rootfs,
            Vec::new(),
        )
        .await
        .expect("create");
    assert!(pid > 0);
    sb.close_stdin("c1", "").await.expect("close stdin");
    sb.start_container("c1").await.expect("start");
    let (out, err) = tokio::join!(sb.read_all("c1", "", false), sb.read_all("c1", "", true));
    assert_eq!(String::from_utf8_lossy(&out.expect("stdout")), "out\n");
    assert_eq!(String::from_utf8_lossy(&err.expect("stderr")), "err\n");
    assert_eq!(sb.wait("c1", "").await.expect("wait"), (3, 0));
    sb.remove_container("c1").await.expect("remove");

    // A long-running container: hostname, exec, signals.
    sb.create_container("c2", spec(&["sleep", "1000"]), &rootfs, Vec::new())
        .await
        .expect("create c2");
    sb.start_container("c2").await.expect("start c2");
    sb.exec(
        "c2",
        "e1",
        &process(&["sh", "-c", "echo hello from $(hostname); id -u"]),
    )
    .await
    .expect("exec");
    sb.close_stdin("c2", "e1").await.expect("close");
    let out = sb.read_all("c2", "e1", false).await.expect("exec stdout");
    assert_eq!(String::from_utf8_lossy(&out), "hello from kata-test\n0\n");
    assert_eq!(sb.wait("c2", "e1").await.expect("wait exec"), (0, 0));
    // UpdateContainer changes the guest cgroup; StatsContainer reads it.
    sb.update(
        "c2",
        br#"{"memory":{"limit":268435456},"pids":{"limit":64}}"#.to_vec(),
    )
    .await
    .expect("update");
    let limits = read_guest(
        &sb,
        "c2",
        "u1",
        "cat /proc/self/cgroup /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max",
    )
    .await;
    // The spec asks for a cgroup namespace (oci-spec's default, as runc's): the container's
    // own cgroup is its root, mounted at /sys/fs/cgroup.
    assert_eq!(limits, "0::/\n268435456\n64\n");
    let stats = sb.stats("c2").await.expect("stats");
    assert_eq!(stats.memory_limit, 268435456);
    assert!(
        stats.memory_usage > 0 && stats.pids_current >= 1,
        "{stats:?}"
    );

    // Idle footprint on the host (a measurement, printed for the record).
    let pss = |pid: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Pss:")
                        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
                })
            })
            .unwrap_or(0)
    };
    let vfsd: u64 = processes_named(&format!(
        "virtiofsd --socket-path /run/vc/vm/{id}/vfsd.sock"
    ))
    .iter()
    .filter_map(|l| l.split(':').next())
    .map(pss)
    .sum();
    eprintln!(
        "idle PSS: QEMU {} KiB, virtiofsd {} KiB (default_memory {} MiB)",
        pss(&sb.host_pid().to_string()),
        vfsd,
        sb.config().hypervisor.default_memory
    );

    let e = sb
        .exec("c2", "e2", &process(&["/no/such/binary"]))
        .await
        .expect_err("missing binary");
    assert!(e.to_string().contains("/no/such/binary"), "{e}");

    // Hot-plug 1 vCPU and 512 MiB and see them in the guest.
    let (cpus_before, mem_before) = (
        sb.resources().0,
        read_guest(&sb, "c2", "m0", "grep MemTotal /proc/meminfo").await,
    );
    sb.set_hotplugged(1, 512).await.expect("hotplug");
    let (online, mem_kb) = sb.guest_resources().await.expect("guest resources");
    assert_eq!(online, cpus_before + 1);
    let nproc = read_guest(&sb, "c2", "n1", "nproc").await;
    assert_eq!(nproc.trim(), (cpus_before + 1).to_string());
    let mem_after = read_guest(&sb, "c2", "m1", "grep MemTotal /proc/meminfo").await;
    let kb = |s: &str| {
        s.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        kb(&mem_after) >= kb(&mem_before) + 500 * 1024,
        "{mem_before} -> {mem_after}"
    );
    assert_eq!(kb(&mem_after), mem_kb);
    // And back: the DIMM is unplugged and the guest's MemTotal is as it booted; the vCPU is
    // unplugged under KVM and offlined (parked) under TCG.
    sb.set_hotplugged(0, 0).await.expect("unplug");
    let (online, back_kb) = sb.guest_resources().await.expect("guest resources");
    assert_eq!(online, cpus_before);
    assert_eq!(back_kb, kb(&mem_before), "MemTotal back to the boot size");
    assert_eq!(sb.resources().0, cpus_before);
    // Plugging again works (under TCG: onlining a parked vCPU).
    sb.set_hotplugged(1, 0).await.expect("plug again");
    assert_eq!(sb.resources().0, cpus_before + 1);

    // SIGTERM kills a sleeping process: it dies of the signal. (The container's init is PID 1
    // of its namespace and, like with runc, ignores signals it has no handler for, except
    // SIGKILL.)
    sb.exec("c2", "s1", &process(&["sleep", "1000"]))
        .await
        .expect("exec sleep");
    sb.signal("c2", "s1", 15, false).await.expect("SIGTERM");
    assert_eq!(
        sb.wait("c2", "s1").await.expect("wait sleep"),
        (128 + 15, 15)
    );
    sb.signal("c2", "", 9, false).await.expect("SIGKILL");
    assert_eq!(sb.wait("c2", "").await.expect("wait c2"), (128 + 9, 9));
    sb.remove_container("c2").await.expect("remove c2");

    sb.stop().await;
    assert_no_leftovers(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn oci_process_and_filesystem_semantics() {
    use oci_spec::runtime::{
        Capability, LinuxCapabilitiesBuilder, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
        UserBuilder,
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    let id = "it-oci";
    kata_sandbox::sandbox::cleanup_stale(id);
    let sb = Sandbox::create(id, &config(&[]))
        .await
        .expect("sandbox boots");

    let script = "id -u; id -g; id -G; pwd; echo $FOO; ulimit -n; \
        touch /should-fail 2>/dev/null && echo rootfs-writable || echo rootfs-readonly; \
        touch /scratch/ok && echo scratch-writable; \
        [ -c /proc/keys ] && echo keys-masked || echo keys-visible; \
        grep -E '^(CapEff|NoNewPrivs)' /proc/self/status";
    let (out, status) = run_container(&sb, &rootfs, "oci1", script, |s| {
        let mut p = s.process().clone().expect("process");
        p.set_user(
            UserBuilder::default()
                .uid(65534u32)
                .gid(65534u32)
                .additional_gids(vec![100u32])
                .build()
                .expect("user"),
        );
        p.set_cwd("/tmp".into());
        p.set_env(Some(vec!["PATH=/bin".into(), "FOO=bar".into()]));
        p.set_rlimits(Some(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(123u64)
            .hard(456u64)
            .build()
            .expect("rlimit")]));
        let caps: std::collections::HashSet<Capability> =
            [Capability::Kill, Capability::NetBindService]
                .into_iter()
                .collect();
        p.set_capabilities(Some(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps.clone())
                .inheritable(caps.clone())
                .ambient(caps)
                .build()
                .expect("caps"),
        ));
        p.set_no_new_privileges(Some(true));
        s.set_process(Some(p));
        let mut root = s.root().clone().unwrap_or_default();
        root.set_readonly(Some(true));
        s.set_root(Some(root));
        let mut mounts = s.mounts().clone().unwrap_or_default();
        mounts.push(
            MountBuilder::default()
                .destination("/scratch")
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec!["mode=1777".into()])
                .build()
                .expect("mount"),
        );
        s.set_mounts(Some(mounts));
    })
    .await;
    assert_eq!(status, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    // CAP_KILL (5) and CAP_NET_BIND_SERVICE (10): 0x420.
    assert_eq!(
        lines,
        [
            "65534",
            "65534",
            "65534 100",
            "/tmp",
            "bar",
            "123",
            "rootfs-readonly",
            "scratch-writable",
            "keys-masked",
            "CapEff:\t0000000000000420",
            "NoNewPrivs:\t1"
        ],
        "{out}"
    );

    // A lot of output just before exit: nothing is lost.
    let (out, status) = run_container(&sb, &rootfs, "oci2", "seq 1 200000; exit 7", |_| {}).await;
    assert_eq!(status, 7);
    assert_eq!(out.lines().count(), 200000);
    assert_eq!(out.lines().last(), Some("200000"));

    // A terminal: the process sees a pty, with the size the host sets.
    let mut s = spec(&["sleep", "1000"]);
    s.set_hostname(None);
    sb.create_container("oci3", s, &rootfs, Vec::new())
        .await
        .expect("create");
    sb.start_container("oci3").await.expect("start");
    let mut p = process(&["sh", "-c", "tty; sleep 0.5; stty size"]);
    p.set_terminal(Some(true));
    sb.exec("oci3", "t1", &p).await.expect("exec tty");
    sb.resize("oci3", "t1", 40, 100).await.expect("resize");
    let out = String::from_utf8_lossy(&sb.read_all("oci3", "t1", false).await.expect("tty out"))
        .to_string();
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("40 100"), "{out:?}");
    assert_eq!(sb.wait("oci3", "t1").await.expect("wait tty"), (0, 0));
    sb.signal("oci3", "", 9, false).await.expect("kill");
    sb.wait("oci3", "").await.expect("wait");
    sb.remove_container("oci3").await.expect("remove");

    sb.stop().await;
    assert_no_leftovers(id);
}

/// The agent's resident memory in bytes, from its metrics.
async fn agent_rss(sb: &Sandbox) -> u64 {
    let text = sb
        .agent_metrics(std::time::Duration::from_secs(10))
        .await
        .expect("agent metrics");
    text.lines()
        .find(|l| l.starts_with("kata_agent_total_rss"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("kata_agent_total_rss")
}

/// A container writes much more than the agent buffers while the host reads slowly: the writer
/// blocks in write(2), the agent's memory stays bounded, and every byte arrives in order.
/// KATA_TEST_SLOW_READER_MIB sets the amount (64 MiB here; `make soak` writes 1 GiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn a_slow_reader_holds_the_writer_back_and_loses_nothing() {
    let mib: u64 = std::env::var("KATA_TEST_SLOW_READER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let total = mib << 20;
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    let id = "it-slow-reader";
    kata_sandbox::sandbox::cleanup_stale(id);
    let sb = Sandbox::create(id, &config(&[]))
        .await
        .expect("sandbox boots");
    let line = b"0123456789abcdef\n";
    let script = format!("yes 0123456789abcdef | head -c {total}");
    sb.create_container("w", spec(&["sh", "-c", &script]), &rootfs, Vec::new())
        .await
        .expect("create");
    sb.close_stdin("w", "").await.expect("close stdin");
    sb.start_container("w").await.expect("start");
    let rss_idle = agent_rss(&sb).await;
    // Nobody reads for 3 s: the writer must be held back by then.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // Where the writer waits (/proc/PID/wchan), twice a second apart: in pipe_write, its
    // stdout pipe full because the agent stopped draining it.
    let wchan = |exec_id: &'static str| {
        let sb = &sb;
        async move {
            read_guest(
                sb,
                "w",
                exec_id,
                // The writer: the pipeline's last process, which shares the container's stdout.
                "t=$(readlink /proc/1/fd/1); for p in /proc/[0-9]*; do [ $p != /proc/1 ] && [ \"$(readlink $p/fd/1)\" = \"$t\" ] && cat $p/wchan; done",
            )
            .await
        }
    };
    let first = wchan("w1").await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let second = wchan("w2").await;
    eprintln!("slow reader: the writer waits in {first:?}, then {second:?}");
    assert!(
        first == "pipe_write" && second == "pipe_write",
        "the writer is held back while nobody reads: {first:?}, {second:?}"
    );
    let mut got: u64 = 0;
    let mut max_rss = rss_idle;
    let mut reads = 0u64;
    let t = Instant::now();
    loop {
        let data = sb.read_output("w", "", false).await.expect("ReadStdout");
        if data.is_empty() {
            break;
        }
        for (i, b) in data.iter().enumerate() {
            let at = (got + i as u64) % line.len() as u64;
            assert_eq!(*b, line[at as usize], "byte {} is wrong", got + i as u64);
        }
        got += data.len() as u64;
        reads += 1;

        // A slow host: a pause after every 64 KiB read, and the agent's RSS now and then.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        if reads.is_multiple_of(256) {
            max_rss = max_rss.max(agent_rss(&sb).await);
        }
    }
    assert_eq!(got, total, "every byte arrived");
    assert_eq!(sb.wait("w", "").await.expect("wait").0, 0);
    eprintln!(
        "{mib} MiB read in {:.1} s; agent RSS {:.1} MiB idle, at most {:.1} MiB while the host read slowly",
        t.elapsed().as_secs_f64(),
        rss_idle as f64 / 1048576.0,
        max_rss as f64 / 1048576.0
    );
    if let Ok(out) = std::env::var("KATA_SLOW_READER_OUT") {
        let summary = serde_json::json!({
            "mib": mib,
            "seconds": t.elapsed().as_secs_f64(),
            "agent_rss_idle_bytes": rss_idle,
            "agent_rss_max_bytes": max_rss,
            "writer_waited_in": second,
            "bytes_lost": total - got,
        });
        std::fs::write(&out, format!("{summary:#}\n")).expect("write the slow-reader summary");
    }
    assert!(
        max_rss <= 32 << 20,
        "the agent's RSS reached {max_rss} bytes"
    );
    sb.remove_container("w").await.expect("remove");
    sb.stop().await;
    assert_no_leftovers(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn the_agent_serves_each_host_that_reconnects() {
    // The VMCache server lets go of the agent and a sandbox connects soon after: what the new
    // host sends at once must not be lost, whether the agent has noticed the previous host
    // leaving or not (the guest learns of a reconnection after its data may have arrived).
    use kata_hypervisor::qemu::argv::{AgentChannel, SharedFsDevice};
    let c = config(&[]);
    let dir = tempfile::tempdir().expect("tmp");
    let accel = kata_sandbox::accel::choose(
        &c.hypervisor,
        Path::new(&c.hypervisor.effective_path(c.hypervisor_kind)),
    )
    .expect("accelerator");
    let socket = dir.path().join("agent.sock");
    let spec = kata_sandbox::sandbox::launch_spec(
        "it-reconnect",
        &c,
        accel,
        dir.path(),
        AgentChannel::Serial {
            socket: socket.clone(),
        },
        SharedFsDevice::None,
    );
    let qemu = PathBuf::from(c.hypervisor.effective_path(c.hypervisor_kind));
    let vm = kata_hypervisor::qemu::vm::Vm::start(
        &qemu,
        &c.hypervisor,
        &spec,
        &dir.path().join("qemu.stderr"),
    )
    .await
    .expect("QEMU");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let first = kata_sandbox::agent::AgentClient::dial_serial(&socket, deadline)
        .await
        .expect("the agent answers");
    drop(first);
    for i in 0..40u64 {
        // Right away, then later and later into the agent's wait for a host.
        tokio::time::sleep(std::time::Duration::from_millis(i * 5)).await;
        let t = Instant::now();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let client = kata_sandbox::agent::AgentClient::dial_serial(&socket, deadline).await;
        assert!(
            client.is_ok(),
            "reconnection {i}: {:?} after {:?}",
            client.err(),
            t.elapsed()
        );
    }
    vm.stop(std::time::Duration::from_secs(2)).await;
}
