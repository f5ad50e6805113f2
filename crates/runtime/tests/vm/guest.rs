//! Guest kernels and shares: the project's kernel, Debian's generic kernel, virtio-9p, a cgroup v2
//! host.

use super::*;

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
