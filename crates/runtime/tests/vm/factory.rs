//! The VM factory: templating and VMCache serve sandboxes.

use super::*;

/// The guest's first 16 random bytes, in hex.
async fn guest_random(sb: &Sandbox, rootfs: &Path, cid: &str) -> String {
    let (out, status) = run_container(
        sb,
        rootfs,
        cid,
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        |_| {},
    )
    .await;
    assert_eq!(status, 0, "{out}");
    assert_eq!(out.len(), 32, "{out}");
    out
}

/// Hot-plugs one vCPU and 256 MiB onto `sb` (a VM that did not boot for it) and checks that
/// the guest sees them.
async fn assert_hotplug_adds_a_vcpu_and_256_mib(sb: &Sandbox, c: &Config) {
    let (_, mem_before) = sb.guest_resources().await.expect("resources");
    sb.set_hotplugged(1, 256).await.expect("hot-plug");
    let (cpus, mem_after) = sb.guest_resources().await.expect("resources");
    assert_eq!(cpus, c.hypervisor.default_vcpus + 1);
    assert!(
        mem_after >= mem_before + 256 * 1024 - 4096,
        "{mem_before} -> {mem_after} KiB"
    );
}

/// A configuration with VM templating on: the initrd, virtio-9p, a template directory of the
/// test's own and a kernel of the test's own (so that it can be changed).
fn template_config(kernel: &Path, template: &str) -> Config {
    let mut c = config(&[]);
    c.hypervisor.image = String::new();
    c.hypervisor.initrd = "/opt/kata/share/kata-containers/kata-containers-initrd.img".into();
    c.hypervisor.shared_fs = kata_config::hypervisor::SharedFs::Virtio9p;
    c.hypervisor.reclaim_guest_freed_memory = false;
    c.hypervisor.kernel = kernel.display().to_string();
    c.factory.enable_template = true;
    c.factory.template_path = template.into();
    c.validate(&HostLimits::current())
        .expect("a valid templating configuration");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn vm_templating_clones_serve_sandboxes() {
    use kata_sandbox::sandbox::SourceKind;
    use kata_sandbox::template::{identity, Template};
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    std::fs::write(rootfs.join("etc/greeting"), "from a clone\n").expect("write");
    let kernel = tmp.path().join("vmlinux");
    std::fs::copy("/opt/kata/share/kata-containers/vmlinux.container", &kernel).expect("kernel");
    let c = template_config(&kernel, "/run/vc/vm/it-template");
    let template = Template::of(&c);
    template.destroy().await.expect("no template left");
    let ids = ["it-tpl-1", "it-tpl-2", "it-tpl-3", "it-tpl-4", "it-tpl-5"];
    for id in ids {
        kata_sandbox::sandbox::cleanup_stale(id);
    }

    // The first sandbox makes the template, then is cloned from it.
    let sb1 = Sandbox::create(ids[0], &c).await.expect("first sandbox");
    assert_eq!(
        sb1.timings().source,
        SourceKind::Template,
        "{:?}",
        sb1.timings()
    );
    assert!(template.exists(), "the first sandbox created the template");
    let accel = sb1.accel();
    assert_eq!(
        template.recorded_identity().as_deref(),
        Some(identity(&c, accel).as_str())
    );
    let (out, status) = run_container(
        &sb1,
        &rootfs,
        "c1",
        "cat /etc/greeting; grep ' / ' /proc/mounts | cut -d' ' -f3; date +%s",
        |_| {},
    )
    .await;
    assert_eq!(status, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["from a clone", "9p"], "{out}");
    // The clock is the host's, not the template's.
    let guest_now: i64 = lines[2].parse().expect("date");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest {guest_now}, host {host_now}"
    );
    let r1 = guest_random(&sb1, &rootfs, "r1").await;

    // A second clone: its own randomness, exec, memory hot-plug.
    let sb2 = Sandbox::create(ids[1], &c).await.expect("second sandbox");
    assert_eq!(sb2.timings().source, SourceKind::Template);
    let r2 = guest_random(&sb2, &rootfs, "r2").await;
    assert_ne!(
        r1, r2,
        "two clones drew the same random bytes: the reseed did not happen"
    );
    assert_hotplug_adds_a_vcpu_and_256_mib(&sb2, &c).await;
    sb2.create_container("long", spec(&["sleep", "600"]), &rootfs, Vec::new())
        .await
        .expect("create");
    sb2.start_container("long").await.expect("start");
    assert_eq!(
        read_guest(&sb2, "long", "e1", "echo exec in a clone").await,
        "exec in a clone\n"
    );

    // A changed kernel makes the template stale: the next sandbox rebuilds it.
    let f = std::fs::File::options()
        .append(true)
        .open(&kernel)
        .expect("kernel");
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .expect("touch the kernel");
    drop(f);
    let stale = template.recorded_identity().expect("template");
    assert_ne!(
        stale,
        identity(&c, accel),
        "a touched kernel changes the identity"
    );
    let sb3 = Sandbox::create(ids[2], &c).await.expect("third sandbox");
    assert_eq!(sb3.timings().source, SourceKind::Template);
    assert_eq!(
        template.recorded_identity().as_deref(),
        Some(identity(&c, accel).as_str()),
        "the template was rebuilt"
    );
    // sb1 and sb2 still run on the old template's memory (a private, detached copy).
    assert_eq!(
        read_guest(&sb2, "long", "e2", "cat /etc/greeting").await,
        "from a clone\n"
    );

    // A broken template (its state cut short) never fails a sandbox: it boots cold.
    let state = template.dir.join(kata_sandbox::template::STATE_FILE);
    let len = std::fs::metadata(&state).expect("state").len();
    std::fs::File::options()
        .write(true)
        .open(&state)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate the state");
    let cold = Sandbox::create(ids[3], &c)
        .await
        .expect("a cold sandbox despite the broken template");
    assert_eq!(cold.timings().source, SourceKind::Cold);
    assert!(
        !template.exists(),
        "a template that failed a clone is not used again"
    );
    let (out, status) = run_container(&cold, &rootfs, "c4", "cat /etc/greeting", |_| {}).await;
    assert_eq!((out.as_str(), status), ("from a clone\n", 0));
    cold.stop().await;
    // Another configuration (more memory) is another template: rebuilt for the files' settings.
    let mut bigger = c.clone();
    bigger.hypervisor.default_memory += 256;
    let sb5 = Sandbox::create(ids[4], &bigger)
        .await
        .expect("sandbox with more memory");
    assert_eq!(sb5.timings().source, SourceKind::Template);
    assert_eq!(
        template.recorded_identity().as_deref(),
        Some(identity(&bigger, accel).as_str()),
        "the template was rebuilt for the new configuration"
    );
    sb5.stop().await;

    // Destroying the template leaves its clones running.
    template.destroy().await.expect("destroy");
    assert!(!template.exists() && !template.dir.exists());
    let (out, status) = run_container(&sb3, &rootfs, "c3", "cat /etc/greeting", |_| {}).await;
    assert_eq!((out.as_str(), status), ("from a clone\n", 0));
    if let Some(e) = sb2.vm_exit() {
        panic!(
            "the second clone's VM died: {}",
            kata_config::error_chain(&e)
        );
    }
    sb2.signal("long", "", 9, false).await.expect("kill");
    sb2.wait("long", "").await.expect("wait");
    sb2.remove_container("long").await.expect("remove");
    for sb in [sb1, sb2, sb3] {
        sb.stop().await;
    }
    for id in ids {
        assert_no_leftovers(id);
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains("it-template"),
        "the template's tmpfs is still mounted"
    );
}

/// The `kata-runtime` that runs the VMCache server (`KATA_RUNTIME`, or the installed one).
fn kata_runtime() -> String {
    std::env::var("KATA_RUNTIME").unwrap_or_else(|_| "/opt/kata/bin/kata-runtime".into())
}

/// A configuration file with VMCache on: the installed one, with `vm_cache_number`, a socket
/// of the test's own and `shared_fs`, and the annotations the tests use allowed. Returns it and
/// the configuration a sandbox loads from it (the server loads the same).
fn cache_config(dir: &Path, number: u32, endpoint: &str, shared_fs: &str) -> (PathBuf, Config) {
    let text = std::fs::read_to_string(INSTALLED).expect("installed configuration");
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let line = match key {
            "vm_cache_number" => format!("vm_cache_number = {number}"),
            "vm_cache_endpoint" => format!("vm_cache_endpoint = {endpoint:?}"),
            "shared_fs" => format!("shared_fs = {shared_fs:?}"),
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    let file = dir.join(format!("cache-{number}-{shared_fs}.toml"));
    std::fs::write(&file, out).expect("write the configuration");
    let mut c = load_path(&file, FoundBy::CommandLine).expect("the VMCache configuration loads");
    c.validate(&HostLimits::current())
        .expect("a valid VMCache configuration");
    (file, c)
}

/// `kata-runtime factory <cmd>` with configuration `file`: (stdout, exit code).
fn factory(file: &Path, cmd: &str) -> (String, i32) {
    let out = std::process::Command::new(kata_runtime())
        .args(["--config", &file.display().to_string(), "factory", cmd])
        .output()
        .expect("run kata-runtime");
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        out.status.code().unwrap_or(-1),
    )
}

/// Starts `kata-runtime factory init` (the VMCache server) in the background, logging to `log`.
fn start_cache_server(file: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::File::create(log).expect("log");
    std::process::Command::new(kata_runtime())
        .args(["--config", &file.display().to_string(), "factory", "init"])
        .env("KATA_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the VMCache server")
}

/// The QEMU pids the server at `endpoint` holds ready, once it holds `n` (within 120 s).
async fn cached_pids(endpoint: &Path, n: usize, log: &Path) -> Vec<i64> {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Ok(s) = kata_sandbox::vmcache::status(endpoint).await {
            if s.vmstatus.len() == n {
                return s.vmstatus.iter().map(|v| v.pid).collect();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the VMCache server did not hold {n} VMs within 120 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The VMCache tests look at every cached VM on the host: one at a time.
static CACHE_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cache_dirs() -> Vec<String> {
    std::fs::read_dir("/run/vc/vm")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vmcache-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn vmcache_hands_booted_vms_to_sandboxes() {
    let _one = CACHE_TESTS.lock().await;
    use kata_sandbox::sandbox::SourceKind;
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    std::fs::write(rootfs.join("etc/greeting"), "from a cached VM\n").expect("write");
    let endpoint = "/run/vc/it-vmcache.sock";
    let (file, c) = cache_config(tmp.path(), 2, endpoint, "virtio-fs");
    let ids = ["it-vmc-1", "it-vmc-2", "it-vmc-3", "it-vmc-4"];
    for id in ids {
        kata_sandbox::sandbox::cleanup_stale(id);
    }
    assert_eq!(factory(&file, "destroy").0, "vm factory destroyed\n");
    assert_eq!(
        factory(&file, "status").0.lines().last(),
        Some("vm factory not enabled")
    );
    let log = tmp.path().join("server.log");
    let mut server = start_cache_server(&file, &log);
    let ready = cached_pids(Path::new(endpoint), 2, &log).await;
    let (status, code) = factory(&file, "status");
    assert_eq!(code, 0);
    let lines: Vec<&str> = status.lines().collect();
    assert_eq!(lines.len(), 4, "{status}");
    assert_eq!(lines[0], format!("VM cache server pid = {}", server.id()));
    for l in &lines[1..3] {
        assert!(
            l.starts_with("VM pid = ") && l.ends_with(" Cpu = 1 Memory = 2048MiB"),
            "{status}"
        );
    }
    assert_eq!(lines[3], "vm factory not enabled");
    // Each VM ran its throw-away container before it was offered.
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged
            .lines()
            .filter(|l| l.contains("warm-up container created, started and removed"))
            .count()
            >= 2,
        "{logged}"
    );
    let mode = std::fs::metadata(endpoint).expect("socket").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // Two sandboxes take the two cached VMs: each its own, on virtio-fs.
    let sb1 = Sandbox::create(ids[0], &c).await.expect("first sandbox");
    let sb2 = Sandbox::create(ids[1], &c).await.expect("second sandbox");
    for sb in [&sb1, &sb2] {
        assert_eq!(sb.timings().source, SourceKind::Cache, "{:?}", sb.timings());
        assert!(
            ready.contains(&i64::from(sb.host_pid())),
            "{} is not a cached QEMU {ready:?}",
            sb.host_pid()
        );
        assert!(sb.virtiofsd_pid().is_some(), "virtiofsd taken over");
    }
    assert_ne!(sb1.host_pid(), sb2.host_pid(), "one VM handed out twice");
    let (out, status) = run_container(
        &sb1,
        &rootfs,
        "c1",
        "cat /etc/greeting; grep ' / ' /proc/mounts | cut -d' ' -f3",
        |_| {},
    )
    .await;
    assert_eq!((out.as_str(), status), ("from a cached VM\nvirtiofs\n", 0));
    assert_hotplug_adds_a_vcpu_and_256_mib(&sb2, &c).await;
    sb2.create_container("long", spec(&["sleep", "600"]), &rootfs, Vec::new())
        .await
        .expect("create");
    sb2.start_container("long").await.expect("start");
    assert_eq!(
        read_guest(&sb2, "long", "e1", "echo exec in a cached VM").await,
        "exec in a cached VM\n"
    );

    // The server refills; a cached VM whose QEMU is killed is replaced, never handed out.
    let refilled = cached_pids(Path::new(endpoint), 2, &log).await;
    let victim = refilled[0];
    // SAFETY: plain kill(2) of a cached QEMU.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let now = cached_pids(Path::new(endpoint), 2, &log).await;
        if !now.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "the killed VM is still listed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let sb3 = Sandbox::create(ids[2], &c).await.expect("third sandbox");
    assert_eq!(sb3.timings().source, SourceKind::Cache);
    assert_ne!(
        i64::from(sb3.host_pid()),
        victim,
        "a dead VM was handed out"
    );
    sb3.stop().await;

    // A pod whose VM settings differ (an annotation's memory) boots its own VM.
    let mut bigger = c.clone();
    bigger.hypervisor.default_memory += 256;
    let own = Sandbox::create(ids[3], &bigger).await.expect("own VM");
    assert_eq!(own.timings().source, SourceKind::Cold);
    own.stop().await;

    // A killed server: sandboxes boot cold, and the first one stops the VMs it left.
    cached_pids(Path::new(endpoint), 2, &log).await;
    server.kill().expect("kill -9 the server");
    server.wait().expect("wait");
    assert_eq!(
        cache_dirs().len(),
        2,
        "the killed server's VMs are still there"
    );
    let after = Sandbox::create(ids[3], &c)
        .await
        .expect("sandbox after the server died");
    assert_eq!(after.timings().source, SourceKind::Cold);
    assert!(
        cache_dirs().is_empty(),
        "the dead server's VMs were not stopped: {:?}",
        cache_dirs()
    );
    after.stop().await;
    // The sandboxes it handed VMs to run on.
    assert_eq!(
        read_guest(&sb2, "long", "e2", "cat /etc/greeting").await,
        "from a cached VM\n"
    );
    sb2.signal("long", "", 9, false).await.expect("kill");
    sb2.wait("long", "").await.expect("wait");
    sb2.remove_container("long").await.expect("remove");
    for sb in [sb1, sb2] {
        sb.stop().await;
    }
    for id in ids {
        assert_no_leftovers(id);
    }
    assert!(
        processes_named("/run/vc/vm/vmcache-").is_empty(),
        "cached QEMU left: {:?}",
        processes_named("/run/vc/vm/vmcache-")
    );
    // destroy removes the dead server's socket.
    assert_eq!(
        factory(&file, "destroy"),
        ("vm factory destroyed\n".into(), 0)
    );
    assert!(!Path::new(endpoint).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn vmcache_with_virtio_9p_and_a_server_that_quits() {
    let _one = CACHE_TESTS.lock().await;
    use kata_sandbox::sandbox::SourceKind;
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    std::fs::write(rootfs.join("etc/greeting"), "over 9p\n").expect("write");
    let endpoint = "/run/vc/it-vmcache-9p.sock";
    let (file, c) = cache_config(tmp.path(), 1, endpoint, "virtio-9p");
    let id = "it-vmc-9p";
    kata_sandbox::sandbox::cleanup_stale(id);
    factory(&file, "destroy");
    let log = tmp.path().join("server.log");
    let mut server = start_cache_server(&file, &log);
    cached_pids(Path::new(endpoint), 1, &log).await;
    // A second server on the same socket is refused.
    let (_, code) = factory(&file, "init");
    assert_ne!(code, 0, "a second server started");
    let sb = Sandbox::create(id, &c).await.expect("sandbox");
    assert_eq!(sb.timings().source, SourceKind::Cache);
    sb.create_container("long", spec(&["sleep", "600"]), &rootfs, Vec::new())
        .await
        .expect("create");
    sb.start_container("long").await.expect("start");
    assert_eq!(
        read_guest(
            &sb,
            "long",
            "e1",
            "cat /etc/greeting; grep ' / ' /proc/mounts | cut -d' ' -f3"
        )
        .await,
        "over 9p\n9p\n"
    );
    // destroy stops the server and its cached VMs; the sandbox's VM runs on.
    cached_pids(Path::new(endpoint), 1, &log).await;
    assert_eq!(
        factory(&file, "destroy"),
        ("vm factory destroyed\n".into(), 0)
    );
    let status = server.wait().expect("the server exits");
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!Path::new(endpoint).exists(), "socket left");
    assert!(
        cache_dirs().is_empty(),
        "cached VMs left: {:?}",
        cache_dirs()
    );
    assert_eq!(
        read_guest(&sb, "long", "e2", "echo still here").await,
        "still here\n"
    );
    sb.signal("long", "", 9, false).await.expect("kill");
    sb.wait("long", "").await.expect("wait");
    sb.remove_container("long").await.expect("remove");
    sb.stop().await;
    assert_no_leftovers(id);
    assert!(processes_named("/run/vc/vm/vmcache-").is_empty());
}
