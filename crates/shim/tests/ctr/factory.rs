//! The VM factory: VM templating and VMCache serve `ctr run` as a cold boot does.

use super::*;

/// `ctr run --rm` twice with runtime options `rc` (ids `<prefix>-plain` and `<prefix>-grown`):
/// stdout, stderr and exit code as with a cold VM, and `--memory-limit` grows the guest; nothing
/// is left.
fn runs_like_a_cold_vm(rc: &[&str], prefix: &str) {
    let script = "grep MemTotal /proc/meminfo; echo out; echo err >&2; exit 3";
    let (plain_id, grown_id) = (format!("{prefix}-plain"), format!("{prefix}-grown"));
    let (plain, err, code) = run(KATA, &plain_id, rc, script, "");
    assert_eq!(code, 3, "{err}");
    assert!(
        plain.ends_with("out\n") && err.contains("err"),
        "{plain} {err}"
    );
    let mut grown_args = rc.to_vec();
    grown_args.extend(["--memory-limit", "536870912"]);
    let (grown, err, code) = run(KATA, &grown_id, &grown_args, script, "");
    assert_eq!(code, 3, "{err}");
    let (a, b) = (mem_total_mib(&plain), mem_total_mib(&grown));
    assert!(b >= a + 500, "--memory-limit 512 MiB: {a} -> {b} MiB");
    assert_no_leftovers(&plain_id);
    assert_no_leftovers(&grown_id);
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn vm_templating_serves_ctr_run_as_a_cold_boot_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let template = "/run/vc/vm/it-ctr-template";
    let cfg = configuration_file(
        dir.path(),
        Root::Initrd,
        None,
        &[
            ("shared_fs", "\"virtio-9p\""),
            ("reclaim_guest_freed_memory", "false"),
            ("enable_template", "true"),
            ("template_path", &format!("{template:?}")),
        ],
    );
    let factory = |cmd: &str| common::kata_runtime(&["--config", cfg.as_str(), "factory", cmd]);
    assert_eq!(factory("destroy").0, "vm factory destroyed\n");
    assert_eq!(factory("status").0, "vm factory is off\n");
    let (out, err, code) = factory("init");
    assert_eq!(
        (out.as_str(), code),
        ("vm factory initialized\n", 0),
        "{err}"
    );
    assert_eq!(factory("status").0, "vm factory is on\n");
    let (env, _, _) = common::kata_runtime(&["--config", cfg.as_str(), "env"]);
    assert!(env.contains("TemplateState = \"on\""), "{env}");

    // Output, stderr, exit code and memory growth, as with a cold VM.
    let rc = ["--runtime-config-path", cfg.as_str()];
    runs_like_a_cold_vm(&rc, "tpl");

    // The VM is a clone (its QEMU loaded the template's state), execs work, and destroying the
    // template leaves it running.
    force_remove("tpl-long");
    run_detached(KATA, "tpl-long", &rc, &["sleep", "600"]);
    let qemu = common::pid_where(|cmd| cmd.contains("sandbox-tpl-long")).expect("QEMU");
    let argv =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{qemu}/cmdline")).expect("argv"))
            .replace('\0', " ");
    assert!(
        argv.contains("-incoming defer")
            && argv.contains(&format!("mem-path={template}/memory,share=off")),
        "{argv}"
    );
    assert_eq!(exec_in("tpl-long", "e1", "echo before").0, "before\n");
    assert_eq!(factory("destroy").0, "vm factory destroyed\n");
    assert_eq!(factory("status").0, "vm factory is off\n");
    assert!(!std::path::Path::new(template).exists());
    assert_eq!(exec_in("tpl-long", "e2", "echo after").0, "after\n");
    kill_and_remove("tpl-long");
    assert_no_leftovers("tpl-long");

    // A configuration that templating cannot serve is refused with the keys named.
    let bad = configuration_file(
        dir.path(),
        Root::ImageNvdimm,
        None,
        &[("enable_template", "true")],
    );
    let (_, err, code) = common::kata_runtime(&["--config", bad.as_str(), "factory", "init"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("enable_template") && err.contains("initrd"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn vmcache_serves_ctr_run_as_a_cold_boot_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let endpoint = "/run/vc/it-ctr-vmcache.sock";
    let cfg = configuration_file(
        dir.path(),
        shipped_root(),
        None,
        &[
            ("vm_cache_number", "3"),
            ("vm_cache_endpoint", &format!("{endpoint:?}")),
        ],
    );
    let cfg = cfg.as_str();
    let factory = |cmd: &str| common::kata_runtime(&["--config", cfg, "factory", cmd]);
    assert_eq!(factory("destroy").0, "vm factory destroyed\n");
    let log = dir.path().join("server.log");
    let handed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("VM handed over")
            .count()
    };
    let mut server = common::start_cache_server(Some(cfg), &log);
    common::cached_vms(Some(cfg), 3, &log);
    let (env, _, _) = common::kata_runtime(&["--config", cfg, "env"]);
    assert!(env.contains("VMCacheNumber = 3"), "{env}");

    // Output, stderr, exit code and memory growth, as with a cold VM.
    let rc = ["--runtime-config-path", cfg];
    let before = handed();
    runs_like_a_cold_vm(&rc, "vmc");
    assert_eq!(handed(), before + 2, "both VMs came from the cache");

    // A long-running sandbox on a cached VM: QEMU and virtiofsd are in its cgroups as if it had
    // started them, execs work.
    force_remove("vmc-long");
    let ready = common::cached_vms(Some(cfg), 3, &log);
    run_detached(KATA, "vmc-long", &rc, &["sleep", "600"]);
    let qemu: u32 = std::fs::read_to_string("/run/vc/vm/vmc-long/pid")
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(ready.contains(&qemu), "QEMU {qemu} is not one of {ready:?}");
    let born = std::fs::read_to_string("/run/vc/vm/vmc-long/adopted-from").expect("adopted-from");
    assert!(born.starts_with("vmcache-"), "{born}");
    let overhead = std::path::Path::new("/sys/fs/cgroup/memory/kata_overhead/vmc-long");
    let procs = common::cgroup_members(overhead, "cgroup.procs");
    let virtiofsd = common::virtiofsd_pids(&born);
    assert_eq!(virtiofsd.len(), 2, "the cached VM's virtiofsd");
    for pid in std::iter::once(qemu).chain(virtiofsd) {
        assert!(
            procs.contains(&pid),
            "{pid} is not in the overhead cgroup {procs:?}"
        );
    }
    let vcpus = common::cgroup_members(
        std::path::Path::new("/sys/fs/cgroup/cpu/default/kata_vmc-long"),
        "tasks",
    );
    assert!(!vcpus.is_empty(), "no vCPU thread in the sandbox cgroup");
    for tid in &vcpus {
        assert!(
            std::path::Path::new(&format!("/proc/{qemu}/task/{tid}")).exists(),
            "thread {tid} is not QEMU's"
        );
    }
    assert_eq!(exec_in("vmc-long", "e1", "echo before").0, "before\n");

    // Ten sandboxes at once from a cache of three: every one runs, no VM serves two.
    common::cached_vms(Some(cfg), 3, &log);
    let before = handed();
    let burst: Vec<_> = (0..10)
        .map(|i| {
            let rc = rc.map(str::to_string);
            std::thread::spawn(move || {
                let rc: Vec<&str> = rc.iter().map(String::as_str).collect();
                let id = format!("vmc-burst-{i}");
                let r = run(KATA, &id, &rc, "cat /proc/sys/kernel/random/boot_id", "");
                (id, r)
            })
        })
        .collect();
    let mut boots = std::collections::BTreeSet::new();
    for t in burst {
        let (id, (out, err, code)) = t.join().expect("thread");
        assert_eq!(code, 0, "{id}: {err}");
        assert!(
            boots.insert(out.trim().to_string()),
            "{id}: a VM served two sandboxes"
        );
        assert_no_leftovers(&id);
    }
    assert_eq!(boots.len(), 10);
    assert!(
        handed() >= before + 3,
        "{} VMs came from the cache",
        handed() - before
    );

    // destroy stops the server and its cached VMs; the sandbox on a cached VM runs on.
    assert_eq!(factory("destroy").0, "vm factory destroyed\n");
    let status = server.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(!std::path::Path::new(endpoint).exists(), "socket left");
    assert_eq!(exec_in("vmc-long", "e2", "echo after").0, "after\n");
    kill_and_remove("vmc-long");
    assert_no_leftovers("vmc-long");
    assert_eq!(common::cached_vm_leftovers(), Vec::<String>::new());

    // A server killed while sandboxes start: they all run (cached or cold), and the first
    // sandbox that finds it gone stops the VMs it left.
    let mut server = common::start_cache_server(Some(cfg), &log);
    common::cached_vms(Some(cfg), 3, &log);
    let starting: Vec<_> = (0..3)
        .map(|i| {
            let rc = rc.map(str::to_string);
            std::thread::spawn(move || {
                let rc: Vec<&str> = rc.iter().map(String::as_str).collect();
                let id = format!("vmc-killed-{i}");
                let r = run(KATA, &id, &rc, "echo ran", "");
                (id, r)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.kill().expect("kill -9 the server");
    server.wait().expect("wait");
    for t in starting {
        let (id, (out, err, code)) = t.join().expect("thread");
        assert_eq!((out.as_str(), code), ("ran\n", 0), "{id}: {err}");
        assert_no_leftovers(&id);
    }
    let (out, err, code) = run(KATA, "vmc-after", &rc, "echo cold", "");
    assert_eq!((out.as_str(), code), ("cold\n", 0), "{err}");
    assert_no_leftovers("vmc-after");
    assert_eq!(common::cached_vm_leftovers(), Vec::<String>::new());
    assert_eq!(factory("destroy").0, "vm factory destroyed\n");
    assert!(
        !std::path::Path::new(endpoint).exists(),
        "stale socket left"
    );

    // virtio-9p: the cached VM's export is handed over with it.
    let p9 = dir.path().join("9p");
    std::fs::create_dir_all(&p9).expect("dir");
    let cfg9 = configuration_file(
        &p9,
        shipped_root(),
        None,
        &[
            ("shared_fs", "\"virtio-9p\""),
            ("vm_cache_number", "1"),
            ("vm_cache_endpoint", &format!("{endpoint:?}")),
        ],
    );
    let mut server = common::start_cache_server(Some(&cfg9), &log);
    common::cached_vms(Some(&cfg9), 1, &log);
    let before = handed();
    let rc9 = ["--runtime-config-path", cfg9.as_str()];
    let (out, err, code) = run(
        KATA,
        "vmc-9p",
        &rc9,
        "grep ' / ' /proc/mounts | cut -d' ' -f3; exit 4",
        "",
    );
    assert_eq!((out.as_str(), code), ("9p\n", 4), "{err}");
    assert_eq!(handed(), before + 1, "the VM came from the cache");
    assert_no_leftovers("vmc-9p");
    let (out, _, _) = common::kata_runtime(&["--config", &cfg9, "factory", "destroy"]);
    assert_eq!(out, "vm factory destroyed\n");
    assert!(server.wait().expect("wait").success());
    assert_eq!(common::cached_vm_leftovers(), Vec::<String>::new());
}
