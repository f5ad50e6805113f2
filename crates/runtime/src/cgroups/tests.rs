//! Unit tests of [`super`].

use super::*;

const HYBRID: &str = "\
25 24 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid shared:6 - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/cpuset rw,nosuid shared:12 - cgroup cgroup rw,cpuset
33 25 0:30 / /sys/fs/cgroup/freezer rw,nosuid shared:13 - cgroup cgroup rw,freezer
";
const HYBRID_SELF: &str = "\
12:freezer:/
5:cpuset:/
4:memory:/user.slice
3:cpu,cpuacct:/user.slice
1:name=systemd:/user.slice/session-1.scope
0::/user.slice/session-1.scope
";

#[test]
fn hybrid_layout_uses_the_v1_controllers() {
    let Layout::V1(h) = Layout::parse(HYBRID, HYBRID_SELF).expect("parses") else {
        panic!("expected v1");
    };
    let mounts: Vec<_> = h.iter().map(|h| h.mount.display().to_string()).collect();
    assert_eq!(
        mounts,
        [
            "/sys/fs/cgroup/cpu,cpuacct",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpuset"
        ]
    );
    assert_eq!(h[0].controllers, ["cpu", "cpuacct"]);
    assert_eq!(h[0].own, "/user.slice");
    assert_eq!(h[2].own, "/");
}

#[test]
fn unified_layout() {
    let mi = "30 25 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    let Layout::V2(h) = Layout::parse(mi, "0::/system.slice/containerd.service\n").expect("parses")
    else {
        panic!("expected v2");
    };
    assert_eq!(h.own, "/system.slice/containerd.service");
    assert_eq!(
        h.dir("/kubepods/kata_x"),
        PathBuf::from("/sys/fs/cgroup/kubepods/kata_x")
    );
    assert!(Layout::parse("", "").is_err());
}

#[test]
fn cgroup_paths() {
    let p = |s| SandboxCgroupPath::parse(s).map(|p| (p.parent, p.relative));
    assert_eq!(
        p("/kubepods/besteffort/pod1/abc").ok(),
        Some(("/kubepods/besteffort/pod1".into(), false))
    );
    assert_eq!(p("/default/abc").ok(), Some(("/default".into(), false)));
    assert_eq!(p("/abc").ok(), Some(("/".into(), false)));
    assert_eq!(p("").ok(), Some(("/".into(), false)));
    assert_eq!(p("pods/abc").ok(), Some(("pods".into(), true)));
    assert_eq!(
        p("kubepods-besteffort-pod1.slice:cri-containerd:abc").ok(),
        Some((
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice".into(),
            false
        ))
    );
    assert_eq!(
        p("system.slice:docker:abc").ok(),
        Some(("/system.slice".into(), false))
    );
    for bad in [
        "/kubepods/../etc/abc",
        "a:b",
        "x.scope:p:n",
        "a--b.slice:p:n",
    ] {
        let e = p(bad).expect_err(bad).to_string();
        assert!(e.contains("cgroupsPath"), "{e}");
    }
}

#[test]
fn cpu_limits_sum_over_a_common_period() {
    let l = |quota, period| Some(CpuLimit { quota, period });
    assert_eq!(
        sum_cpu_limits(&[l(50_000, 100_000), l(25_000, 50_000)]),
        l(100_000, 100_000)
    );
    assert_eq!(sum_cpu_limits(&[l(50_000, 100_000), None]), None);
    assert_eq!(sum_cpu_limits(&[]), None);
    assert_eq!(sum_cpu_limits(&[l(-1, 100_000)]), None);
    assert_eq!(sum_cpu_limits(&[l(10, 100_000)]), l(1000, 100_000));
}

fn fake(root: &Path) -> Layout {
    let mk = |name: &str, ctl: &[&str]| {
        let mount = root.join(name);
        std::fs::create_dir_all(&mount).expect("mkdir");
        Hierarchy {
            mount,
            controllers: ctl.iter().map(|s| s.to_string()).collect(),
            root: "/".into(),
            own: "/".into(),
        }
    };
    let cpuset = mk("cpuset", &["cpuset"]);
    std::fs::write(cpuset.mount.join("cpuset.cpus"), "0-1\n").expect("write");
    std::fs::write(cpuset.mount.join("cpuset.mems"), "0\n").expect("write");
    Layout::V1(vec![
        mk("cpu,cpuacct", &["cpu", "cpuacct"]),
        mk("memory", &["memory"]),
        cpuset,
    ])
}

#[test]
fn overhead_layout_splits_vcpus_from_the_rest() {
    let t = tempfile::tempdir().expect("tempdir");
    let state = t.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let cg =
        HostCgroups::setup(fake(t.path()), "sb1", "/pods/p1/sb1", false, &state).expect("setup");
    let root = t.path();
    // Sandbox cgroup only where CPU is controlled; the overhead one everywhere.
    assert_eq!(
        cg.sandbox_dirs(),
        [
            root.join("cpu,cpuacct/pods/p1/kata_sb1"),
            root.join("cpuset/pods/p1/kata_sb1")
        ]
    );
    assert_eq!(cg.overhead_dirs().len(), 3);
    let me = std::process::id().to_string();
    let procs = std::fs::read_to_string(root.join("memory/kata_overhead/sb1/cgroup.procs"))
        .expect("joined");
    assert_eq!(procs, me);
    // New cpusets inherit cpus and mems level by level.
    for d in ["cpuset/pods", "cpuset/pods/p1", "cpuset/pods/p1/kata_sb1"] {
        let cpus = std::fs::read_to_string(root.join(d).join("cpuset.cpus")).expect("cpus");
        assert_eq!(cpus, "0-1", "{d}");
    }
    cg.add_vcpu_threads(10, &[11, 12]).expect("threads");
    let tasks =
        std::fs::read_to_string(root.join("cpu,cpuacct/pods/p1/kata_sb1/tasks")).expect("tasks");
    assert_eq!(tasks, "12", "the fake keeps the last write");
    cg.set_cpu_limit(Some(CpuLimit {
        quota: 150_000,
        period: 100_000,
    }))
    .expect("limit");
    let quota = root.join("cpu,cpuacct/pods/p1/kata_sb1/cpu.cfs_quota_us");
    assert_eq!(std::fs::read_to_string(&quota).expect("quota"), "150000");
    let record = std::fs::read_to_string(state.join(RECORD_FILE)).expect("record");
    assert_eq!(record.lines().count(), 5);
    // A second sandbox with the same id is refused, naming the cgroup.
    let e = HostCgroups::setup(
        fake(t.path()),
        "sb1",
        "/pods/p1/sb1",
        false,
        &t.path().join("s2"),
    )
    .expect_err("exists");
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn sandbox_only_layout_joins_the_sandbox_cgroup_everywhere() {
    let t = tempfile::tempdir().expect("tempdir");
    let cg =
        HostCgroups::setup(fake(t.path()), "sb2", "/pods/p2/sb2", true, t.path()).expect("setup");
    assert_eq!(cg.sandbox_dirs().len(), 3);
    assert!(cg.overhead_dirs().is_empty());
    let procs = std::fs::read_to_string(t.path().join("memory/pods/p2/kata_sb2/cgroup.procs"))
        .expect("joined");
    assert_eq!(procs, std::process::id().to_string());
    // No limit is set on it: the pod cgroup above limits the sandbox.
    cg.set_cpu_limit(Some(CpuLimit {
        quota: 1000,
        period: 100_000,
    }))
    .expect("no-op");
    assert!(!t
        .path()
        .join("cpu,cpuacct/pods/p2/kata_sb2/cpu.cfs_quota_us")
        .exists());
    let bad = HostCgroups::setup(fake(t.path()), "sb3", "/pods/../x/sb3", true, t.path());
    assert!(bad.is_err());
}
