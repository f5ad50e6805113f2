//! A real sandbox: QEMU (TCG here), the project's guest kernel and initrd, virtiofsd, and
//! kata-agent as PID 1. Needs root and `make install` (make test does both).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kata_config::load::{load_path, FoundBy};
use kata_config::{Config, HostLimits};
use kata_sandbox::{Sandbox, SandboxError};
use oci_spec::runtime::{ProcessBuilder, Spec};

const INSTALLED: &str = "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml";

fn config(extra: &[(&str, &str)]) -> Config {
    let mut c = load_path(Path::new(INSTALLED), FoundBy::CommandLine)
        .expect("installed configuration (run make install)");
    let map: BTreeMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.hypervisor.enable_annotations = vec![".*".into()];
    c.hypervisor.valid_kernel_paths = vec!["/**".into(), "/*".into()];
    c.apply_annotations(&map).expect("annotations");
    c.validate(&HostLimits::current()).expect("valid");
    c
}

/// A root filesystem with busybox and its applets.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .expect("passwd");
    root
}

fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().expect("default process");
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec.set_hostname(Some("kata-test".into()));
    spec
}

fn process(args: &[&str]) -> oci_spec::runtime::Process {
    ProcessBuilder::default()
        .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .build()
        .expect("process")
}

fn processes_named(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(name) {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

fn assert_no_leftovers(id: &str) {
    assert!(
        processes_named(&format!("sandbox-{id}")).is_empty(),
        "QEMU left: {:?}",
        processes_named(&format!("sandbox-{id}"))
    );
    assert!(
        processes_named(&format!(
            "virtiofsd --socket-path /run/vc/vm/{id}/vfsd.sock"
        ))
        .is_empty(),
        "virtiofsd left"
    );
    assert!(
        !Path::new("/run/vc/vm").join(id).exists(),
        "VM state directory left"
    );
    assert!(
        !Path::new("/run/kata-containers/shared/sandboxes")
            .join(id)
            .exists(),
        "shared directory left"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(id),
        "mounts left: {}",
        mounts
            .lines()
            .filter(|l| l.contains(id))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

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
    // unplugged under KVM and stays under TCG (QEMU 7.2 cannot plug one again there).
    sb.set_hotplugged(0, 0).await.expect("unplug");
    let (online, back_kb) = sb.guest_resources().await.expect("guest resources");
    let kept = u32::from(sb.accel() == kata_hypervisor::Accel::Tcg);
    assert_eq!(online, cpus_before + kept);
    assert_eq!(back_kb, kb(&mem_before), "MemTotal back to the boot size");
    assert_eq!(sb.resources().0, cpus_before + kept);
    // Plugging again reuses what stayed: no growth beyond the demand.
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

async fn read_guest(sb: &Sandbox, cid: &str, exec_id: &str, cmd: &str) -> String {
    sb.exec(cid, exec_id, &process(&["sh", "-c", cmd]))
        .await
        .expect("exec");
    sb.close_stdin(cid, exec_id).await.expect("close");
    let out = sb.read_all(cid, exec_id, false).await.expect("read");
    sb.wait(cid, exec_id).await.expect("wait");
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and QEMU (make test runs it)"]
async fn missing_assets_are_named_and_nothing_is_left() {
    for (key, value, expect) in [
        ("kernel", "/opt/kata/share/kata-containers/no-such-vmlinux", "guest kernel /opt/kata/share/kata-containers/no-such-vmlinux does not exist ([hypervisor.qemu].kernel)"),
        ("initrd", "/opt/kata/share/kata-containers/no-such-initrd", "guest initrd /opt/kata/share/kata-containers/no-such-initrd does not exist ([hypervisor.qemu].initrd)"),
        ("image", "/opt/kata/share/kata-containers/no-such-image", "guest rootfs image /opt/kata/share/kata-containers/no-such-image does not exist ([hypervisor.qemu].image)"),
    ] {
        let mut c = config(&[]);
        match key {
            "kernel" => c.hypervisor.kernel = value.into(),
            "initrd" => {
                c.hypervisor.image = String::new();
                c.hypervisor.initrd = value.into();
            }
            _ => {
                c.hypervisor.initrd = String::new();
                c.hypervisor.image = value.into();
            }
        }
        let id = format!("it-missing-{key}");
        kata_sandbox::sandbox::cleanup_stale(&id);
        let e = Sandbox::create(&id, &c).await.expect_err("must fail");
        let msg = kata_config::error_chain(&e);
        assert!(msg.contains(expect), "{msg}");
        assert_no_leftovers(&id);
    }
    let mut c = config(&[]);
    c.hypervisor.path = "/usr/bin/no-such-qemu".into();
    let e = Sandbox::create("it-missing-qemu", &c)
        .await
        .expect_err("no qemu");
    assert!(
        kata_config::error_chain(&e).contains("/usr/bin/no-such-qemu"),
        "{}",
        kata_config::error_chain(&e)
    );
    assert_no_leftovers("it-missing-qemu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn a_panicking_guest_is_reported_with_its_console() {
    let mut c = config(&[]);
    // rdinit= for an initrd, init= for the rootfs image (the default).
    c.hypervisor.kernel_params = "rdinit=/no-such-init init=/no-such-init".into();
    c.agent.dial_timeout = 60;
    kata_sandbox::sandbox::cleanup_stale("it-panic");
    let t = Instant::now();
    let e = Sandbox::create("it-panic", &c).await.expect_err("panics");
    let msg = kata_config::error_chain(&e);
    assert!(matches!(e, SandboxError::Vm(_)), "{msg}");
    assert!(msg.contains("Kernel panic"), "{msg}");
    assert!(
        t.elapsed().as_secs() < 60,
        "reported within the dial timeout"
    );
    assert_no_leftovers("it-panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn an_agent_that_never_answers_times_out_with_the_console() {
    let mut c = config(&[]);
    // busybox sh as init: the guest runs, but nothing serves the agent API.
    c.hypervisor.kernel_params = "rdinit=/bin/sh init=/bin/sh".into();
    c.agent.dial_timeout = 6;
    kata_sandbox::sandbox::cleanup_stale("it-silent");
    let t = Instant::now();
    let e = Sandbox::create("it-silent", &c)
        .await
        .expect_err("no agent");
    let secs = t.elapsed().as_secs_f64();
    let msg = kata_config::error_chain(&e);
    assert!(
        matches!(e, SandboxError::AgentTimeout { timeout: 6, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("[agent.kata].dial_timeout") && msg.contains("guest console:"),
        "{msg}"
    );
    assert!((6.0..30.0).contains(&secs), "gave up after {secs:.1} s");
    assert_no_leftovers("it-silent");
}

/// Runs `script` as a container's init with `edit` applied to the spec; returns (stdout, status).
async fn run_container(
    sb: &Sandbox,
    rootfs: &Path,
    id: &str,
    script: &str,
    edit: impl FnOnce(&mut Spec),
) -> (String, i32) {
    let mut s = spec(&["sh", "-c", script]);
    edit(&mut s);
    sb.create_container(id, s, rootfs, Vec::new())
        .await
        .expect("create");
    sb.close_stdin(id, "").await.expect("close stdin");
    sb.start_container(id).await.expect("start");
    let out = sb.read_all(id, "", false).await.expect("stdout");
    let (status, _) = sb.wait(id, "").await.expect("wait");
    sb.remove_container(id).await.expect("remove");
    (String::from_utf8_lossy(&out).to_string(), status)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn virtio_9p_shares_the_rootfs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    std::fs::write(rootfs.join("etc/greeting"), "shared over 9p\n").expect("write");
    let mut c = config(&[]);
    c.hypervisor.shared_fs = kata_config::hypervisor::SharedFs::Virtio9p;
    let id = "it-9p";
    kata_sandbox::sandbox::cleanup_stale(id);
    let sb = Sandbox::create(id, &c)
        .await
        .expect("sandbox boots with 9p");
    assert!(
        processes_named(&format!("virtiofsd --socket-path /run/vc/vm/{id}/")).is_empty(),
        "no virtiofsd with 9p"
    );
    let (out, status) = run_container(&sb, &rootfs, "p1", "cat /etc/greeting; grep ' / ' /proc/mounts | cut -d' ' -f3; echo written > /tmp/from-guest", |s| {
        let mut root = s.root().clone().unwrap_or_default();
        root.set_readonly(Some(false));
        s.set_root(Some(root));
    })
    .await;
    assert_eq!(status, 0, "{out}");
    assert_eq!(out, "shared over 9p\n9p\n");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/from-guest")).expect("written through the share"),
        "written\n"
    );
    sb.stop().await;
    assert_no_leftovers(id);
}

/// The file names of a `newc` cpio archive.
fn cpio_names(bytes: &[u8]) -> Vec<String> {
    let field = |at: usize, i: usize| {
        let f = &bytes[at + 6 + 8 * i..at + 6 + 8 * (i + 1)];
        usize::from_str_radix(std::str::from_utf8(f).expect("hex"), 16).expect("hex field")
    };
    let mut names = Vec::new();
    let mut at = 0;
    while at + 110 <= bytes.len() && &bytes[at..at + 6] == b"070701" {
        let (size, namesize) = (field(at, 6), field(at, 11));
        let name = String::from_utf8_lossy(&bytes[at + 110..at + 110 + namesize - 1]).to_string();
        if name == "TRAILER!!!" {
            break;
        }
        names.push(name);
        let data = (at + 110 + namesize + 3) & !3;
        at = (data + size + 3) & !3;
    }
    names
}

/// The default guest kernel is the project's own: everything built in, so the initrd carries no
/// modules and the agent loads none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn the_default_kernel_has_everything_built_in() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    let c = config(&[]);
    let initrd = std::fs::read("/opt/kata/share/kata-containers/kata-containers-initrd.img")
        .expect("installed initrd");
    let names = cpio_names(&initrd);
    assert!(names.iter().any(|n| n == "init"), "{names:?}");
    let modules: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.ends_with(".ko") || n.starts_with("lib/modules") || n.contains("kata-agent/modules")
        })
        .collect();
    assert!(modules.is_empty(), "the initrd holds modules: {modules:?}");
    let id = "it-kernel";
    kata_sandbox::sandbox::cleanup_stale(id);
    let sb = Sandbox::create(id, &c).await.expect("sandbox boots");
    let console = std::fs::read_to_string(sb.paths().vm_dir.join("console.log")).expect("console");
    assert!(
        console.contains("kata-agent: loaded 0 kernel modules"),
        "{console}"
    );
    // /proc/modules exists only in a kernel with module support; the configuration is in
    // /proc/config.gz (CONFIG_IKCONFIG_PROC).
    let (out, status) = run_container(
        &sb,
        &rootfs,
        "k1",
        "uname -r; test -e /proc/modules && echo modules; zcat /proc/config.gz | grep -E '^(# )?CONFIG_(MODULES|VIRTIO_MEM|IP_NF_IPTABLES|BLK_DEV_PMEM)[= ]' | sort",
        |_| {},
    )
    .await;
    assert_eq!(status, 0, "{out}");
    let release = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/kernel/release"),
    )
    .expect("build/kernel/release");
    assert_eq!(
        out,
        format!(
            "{}\n# CONFIG_MODULES is not set\nCONFIG_BLK_DEV_PMEM=y\nCONFIG_IP_NF_IPTABLES=y\nCONFIG_VIRTIO_MEM=y\n",
            release.trim()
        )
    );
    sb.stop().await;
    assert_no_leftovers(id);
}

/// Debian's generic kernel stays a working option (`make kernel KERNEL=debian`): boot it once,
/// with its own initrd and modules, so it does not rot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn debians_generic_kernel_still_boots() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    let abi = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kernel/debian-version"),
    )
    .expect("pin");
    let ver = format!("{}-amd64", abi.trim());
    let assets = Path::new("/opt/kata/share/kata-containers");
    let mut c = config(&[]);
    c.hypervisor.kernel = assets.join(format!("vmlinux-{ver}")).display().to_string();
    c.hypervisor.image = String::new();
    c.hypervisor.initrd = assets
        .join(format!("kata-containers-initrd-{ver}.img"))
        .display()
        .to_string();
    c.hypervisor.valid_initrd_paths = vec!["/**".into(), "/*".into()];
    c.validate(&HostLimits::current()).expect("valid");
    let id = "it-debian-kernel";
    kata_sandbox::sandbox::cleanup_stale(id);
    let sb = Sandbox::create(id, &c)
        .await
        .expect("sandbox boots Debian's kernel");
    let console = std::fs::read_to_string(sb.paths().vm_dir.join("console.log")).expect("console");
    let loaded = console
        .lines()
        .find_map(|l| {
            l.split("kata-agent: loaded ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u32>().ok())
        })
        .unwrap_or(0);
    assert!(loaded >= 10, "Debian's kernel needs its modules: {console}");
    let (out, status) = run_container(&sb, &rootfs, "d1", "uname -r", |_| {}).await;
    assert_eq!((out.trim(), status), (ver.as_str(), 0));
    sb.stop().await;
    assert_no_leftovers(id);
}

/// Set in the child that [`a_sandbox_on_a_cgroup_v2_host`] runs in its own mount namespace.
const CGROUP2_CHILD: &str = "KATA_TEST_CGROUP2_CHILD";

/// The host cgroup v2 code path, end to end with a real sandbox. This host is cgroup v1, so the
/// test re-runs itself in a private mount namespace whose only cgroup mount is a cgroup2
/// hierarchy at /sys/fs/cgroup, as on a v2 host: the runtime then finds a v2 layout and
/// creates, joins, fills and removes the sandbox's cgroups there. What cannot be shown here:
/// the controllers (cpu, memory, ...) stay bound to the host's v1 hierarchies, so the v2
/// directories have no `cpu.max` and the CPU limit is not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn a_sandbox_on_a_cgroup_v2_host() {
    use kata_sandbox::cgroups::Layout;
    if std::env::var_os(CGROUP2_CHILD).is_none() && !matches!(Layout::current(), Ok(Layout::V2(_)))
    {
        // Every cgroup mount (and the tmpfs holding them) goes, deepest first; cgroup2 comes.
        let script = "set -e; \
            for m in $(awk '$9 ~ /^cgroup/ || $5 == \"/sys/fs/cgroup\" {print $5}' /proc/self/mountinfo | sort -r); do umount -l \"$m\"; done; \
            mount -t cgroup2 cgroup2 /sys/fs/cgroup; \
            exec \"$0\" \"$@\"";
        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(&exe)
            .args([
                "--exact",
                "a_sandbox_on_a_cgroup_v2_host",
                "--include-ignored",
                "--nocapture",
            ])
            .env(CGROUP2_CHILD, "1")
            .status()
            .expect("unshare");
        assert!(
            status.success(),
            "the cgroup v2 run failed (its output is above)"
        );
        return;
    }
    let layout = Layout::current().expect("cgroup layout");
    let Layout::V2(h) = &layout else {
        panic!("expected the unified hierarchy only: {layout:?}")
    };
    assert_eq!(h.mount, Path::new("/sys/fs/cgroup"));
    let tmp = tempfile::tempdir().expect("tmp");
    let rootfs = busybox_rootfs(tmp.path());
    let id = "it-cgroup2";
    kata_sandbox::sandbox::cleanup_stale(id);
    let placement = kata_sandbox::Placement {
        netns: None,
        new_netns: false,
        cgroups_path: Some("/kata-test-v2/pod-it".into()),
        ..Default::default()
    };
    let sb = Sandbox::create_in(id, &config(&[]), &placement)
        .await
        .expect("a sandbox on cgroup v2");
    let cg = sb.cgroups().cloned().expect("host cgroups");
    // Kata's rule: the sandbox cgroup replaces the last component of the cgroupsPath.
    let sandbox_dir = PathBuf::from("/sys/fs/cgroup/kata-test-v2/kata_it-cgroup2");
    let overhead = PathBuf::from("/sys/fs/cgroup/kata_overhead/it-cgroup2");
    let procs = |dir: &Path| -> Vec<u32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    // Everything is checked first and asserted after the sandbox stopped, so that a failure
    // leaves nothing running.
    let dirs = (cg.sandbox_dirs(), cg.overhead_dirs());
    // v2 moves whole processes: QEMU (its vCPUs with it) into the sandbox cgroup, the caller
    // (the shim; here the test) into the overhead cgroup.
    let qemu_in = procs(&sandbox_dir).contains(&sb.host_pid());
    let me_in = procs(&overhead).contains(&std::process::id());
    // The v2 CPU limit is written where the controller is enabled; here it is not (see above).
    let limit = cg.set_cpu_limit(Some(kata_sandbox::cgroups::CpuLimit {
        quota: 50_000,
        period: 100_000,
    }));
    let cpu_max = sandbox_dir.join("cpu.max").exists();
    let (out, status) = run_container(&sb, &rootfs, "c1", "echo on-cgroup2", |_| {}).await;
    sb.stop().await;
    assert_eq!(dirs, (vec![sandbox_dir.clone()], vec![overhead.clone()]));
    assert!(qemu_in, "QEMU in {}", sandbox_dir.display());
    assert!(me_in, "the caller in the overhead cgroup");
    assert!(limit.is_ok(), "{limit:?}");
    assert!(!cpu_max, "the cpu controller is v1's on this host");
    assert_eq!((out.as_str(), status), ("on-cgroup2\n", 0));
    assert!(
        !sandbox_dir.exists() && !overhead.exists(),
        "cgroups removed"
    );
    assert!(
        !procs(&Path::new("/sys/fs/cgroup").join(h.own.trim_start_matches('/'))).is_empty(),
        "the caller went back to its own cgroup"
    );
    let _ = std::fs::remove_dir("/sys/fs/cgroup/kata-test-v2");
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
