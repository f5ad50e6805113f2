//! Security settings as runc applies them: seccomp, sysctls, devices and the device cgroup, OCI
//! hooks.

use super::*;

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn seccomp_matches_runc() {
    let dir = tempfile::tempdir().expect("tmp");
    let profile = dir.path().join("deny-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .expect("write");
    let p = profile.display().to_string();
    let custom = ["--seccomp", "--seccomp-profile", p.as_str()];
    let mut outputs = Vec::new();
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        // A custom profile: the same syscall refused with the same errno.
        let (a, err, code) = run(
            runtime,
            &format!("seccomp-{tag}"),
            &custom,
            "mkdir /tmp/d 2>&1; echo mkdir=$?; grep Seccomp: /proc/self/status",
            "",
        );
        assert_eq!(code, 0, "{runtime}: {err}");
        // containerd's default profile: no namespaces without CAP_SYS_ADMIN.
        let (b, err, code) = run(
            runtime,
            &format!("seccomp-default-{tag}"),
            &["--seccomp"],
            "unshare -m true 2>&1; echo unshare=$?; uname -m",
            "",
        );
        assert_eq!(code, 0, "{runtime}: {err}");
        // Execs are filtered too.
        let id = format!("seccomp-exec-{tag}");
        run_detached(runtime, &id, &custom, &["sleep", "1000"]);
        let e = ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "mkdir /tmp/e; echo exec-mkdir=$?",
        ]);
        kill_and_remove(&id);
        outputs.push((a, b, String::from_utf8_lossy(&e.stdout).to_string()));
    }
    assert_eq!(outputs[0], outputs[1], "kata and runc agree");
    let (a, b, e) = &outputs[0];
    assert!(
        a.contains("Operation not permitted") && a.contains("mkdir=1") && a.contains("Seccomp:\t2"),
        "{a}"
    );
    assert!(
        b.contains("unshare(0x20000): Operation not permitted") && b.contains("unshare=1"),
        "{b}"
    );
    assert_eq!(e, "exec-mkdir=1\n");
    // disable_guest_seccomp (Kata's default in its own files) honoured: no filter in the guest.
    // From an annotation only where the node admin allows it ([runtime].enable_annotations).
    let off = [
        "--seccomp",
        "--seccomp-profile",
        p.as_str(),
        "--annotation",
        "io.katacontainers.config.runtime.disable_guest_seccomp=true",
    ];
    let (_, err, code) = run(KATA, "seccomp-refused", &off, "true", "");
    assert_ne!(code, 0);
    assert!(
        err.contains("add a regular expression matching \"disable_guest_seccomp\" to [runtime].enable_annotations"),
        "{err}"
    );
    let shipped =
        std::fs::read_to_string("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
            .expect("shipped configuration");
    // The [runtime] section's `enable_annotations = []` (the hypervisor's comes first).
    let at = shipped.find("\n[runtime]\n").expect("a [runtime] section");
    let (head, tail) = shipped.split_at(at);
    assert!(tail.contains("\nenable_annotations = []\n"));
    let allowing = dir.path().join("allow-seccomp-annotation.toml");
    std::fs::write(
        &allowing,
        format!(
            "{head}{}",
            tail.replacen(
                "\nenable_annotations = []\n",
                "\nenable_annotations = [\"disable_guest_seccomp\"]\n",
                1
            )
        ),
    )
    .expect("write");
    let allowing = allowing.display().to_string();
    let mut args = off.to_vec();
    args.extend(["--runtime-config-path", allowing.as_str()]);
    let (out, err, code) = run(
        KATA,
        "seccomp-disabled",
        &args,
        "mkdir /tmp/d && echo made; grep Seccomp: /proc/self/status",
        "",
    );
    assert_eq!((out.as_str(), code), ("made\nSeccomp:\t0\n", 0), "{err}");
    for id in [
        "seccomp-kata",
        "seccomp-default-kata",
        "seccomp-exec-kata",
        "seccomp-disabled",
    ] {
        assert_no_leftovers(id);
    }
}

/// `ctr run --rm --config SPEC ID`; returns (stdout, stderr, exit code). The spec gets the
/// cgroupsPath `ctr run` gives without `--config`, `/default/ID`: `ctr oci spec` says
/// `/default`, the namespace's own cgroup, which runc removes with everything empty below it
/// when the container goes (a kata sandbox's just-made cgroup among them).
fn run_config(runtime: &str, id: &str, spec: &str) -> (String, String, i32) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec).expect("read spec")).expect("spec json");
    v["linux"]["cgroupsPath"] = serde_json::json!(format!("/default/{id}"));
    let spec = std::path::Path::new(spec).with_file_name(format!("config-{id}.json"));
    std::fs::write(&spec, serde_json::to_vec(&v).expect("json")).expect("write spec");
    let spec = spec.display().to_string();
    let out = ctr(&["run", "--runtime", runtime, "--rm", "--config", &spec, id]);
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn oci_hooks_run_on_the_host_as_runc_runs_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut logs = Vec::new();
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        let log = dir.path().join(format!("hooks-{tag}.log"));
        // Each hook appends its kind and the status and id of the state it read on stdin.
        let hook = |kind: &str| {
            serde_json::json!({
                "path": "/bin/sh",
                "args": ["sh", "-c", format!(
                    "s=$(cat); st=$(echo \"$s\" | sed 's/.*\"status\":\"\\([a-z]*\\)\".*/\\1/'); \
                     id=$(echo \"$s\" | sed 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/'); \
                     echo \"{kind} $st $id $HOOK_ENV\" >> {}", log.display())],
                "env": ["HOOK_ENV=from-spec"],
                "timeout": 10,
            })
        };
        let hooks = serde_json::json!({
            "prestart": [hook("prestart")],
            "createRuntime": [hook("createRuntime")],
            "createContainer": [hook("createContainer")],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")],
        });
        let spec = spec_with_hooks(dir.path(), &["/bin/sh", "-c", "echo ran"], hooks);
        let id = "hooks";
        let (out, err, code) = run_config(runtime, &format!("{id}-{tag}"), &spec);
        assert_eq!((out.as_str(), code), ("ran\n", 0), "{runtime}: {err}");
        let text = std::fs::read_to_string(&log).expect("hooks ran");
        logs.push(text.replace(&format!("{id}-{tag}"), "ID"));
    }
    assert_eq!(
        logs[0], logs[1],
        "kata and runc run the same hooks, in the same order, with the same state"
    );
    assert_eq!(
        logs[0],
        "prestart creating ID from-spec\ncreateRuntime creating ID from-spec\ncreateContainer creating ID from-spec\npoststart created ID from-spec\npoststop stopped ID from-spec\n"
    );
    assert_no_leftovers("hooks-kata");
    // A failing createRuntime hook fails the create with its message; nothing is left.
    let spec = spec_with_hooks(
        dir.path(),
        &["/bin/sh", "-c", "true"],
        serde_json::json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no-network-for-you >&2; exit 1"]}]}),
    );
    let (_, err, code) = run_config(KATA, "hooks-fail", &spec);
    assert_ne!(code, 0);
    assert!(
        err.contains("createRuntime hook /bin/sh failed") && err.contains("no-network-for-you"),
        "{err}"
    );
    assert_no_leftovers("hooks-fail");
    // startContainer hooks would run inside the VM: refused, saying so.
    let spec = spec_with_hooks(
        dir.path(),
        &["/bin/sh", "-c", "true"],
        serde_json::json!({"startContainer": [{"path": "/bin/true"}]}),
    );
    let (_, err, code) = run_config(KATA, "hooks-start", &spec);
    assert_ne!(code, 0);
    assert!(err.contains("startContainer hooks"), "{err}");
    assert_no_leftovers("hooks-start");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn sysctls_match_runc() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut outs = Vec::new();
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        let spec = spec_file(
            dir.path(),
            &["/bin/sh", "-c", "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced"],
            |s| {
                s["linux"]["sysctl"] = serde_json::json!({
                    "net.ipv4.ip_unprivileged_port_start": "1000",
                    "kernel.shm_rmid_forced": "1",
                })
            },
        );
        let (out, err, code) = run_config(runtime, &format!("sysctl-{tag}"), &spec);
        assert_eq!(code, 0, "{runtime}: {err}");
        outs.push(out);
        // A sysctl of no namespace of the container's own: refused by both.
        let spec = spec_file(dir.path(), &["/bin/sh", "-c", "true"], |s| {
            s["linux"]["sysctl"] = serde_json::json!({"vm.overcommit_memory": "1"})
        });
        let (_, err, code) = run_config(runtime, &format!("sysctl-bad-{tag}"), &spec);
        assert_ne!(code, 0, "{runtime}");
        assert!(err.contains("vm.overcommit_memory"), "{runtime}: {err}");
    }
    assert_eq!(outs[0], "1000\n1\n");
    assert_eq!(outs[0], outs[1], "kata and runc");
    assert_no_leftovers("sysctl-kata");
    assert_no_leftovers("sysctl-bad-kata");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn devices_and_the_device_cgroup_match_runc() {
    // A device given with --device appears; a device node made in the container (mknod is
    // allowed by containerd's rules) cannot be opened: the device cgroup refuses /dev/mem.
    let script = "ls -l /dev/fuse | cut -c1-10; \
                  mknod /tmp/mem c 1 1 && (head -c 1 /tmp/mem >/dev/null 2>&1 && echo mem-readable || echo mem-refused); \
                  head -c 3 /dev/zero | wc -c";
    let mut outs = Vec::new();
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        let (out, err, code) = run(
            runtime,
            &format!("devices-{tag}"),
            &["--device", "/dev/fuse"],
            script,
            "",
        );
        assert_eq!(code, 0, "{runtime}: {err}");
        outs.push(out);
    }
    assert_eq!(
        outs[0], "crw-------\nmem-refused\n3\n",
        "the host node's mode, as runc"
    );
    assert_eq!(outs[0], outs[1], "kata and runc");
    assert_no_leftovers("devices-kata");
    // A privileged container's spec lists every host device; those the VM does not have are
    // skipped (said on the guest console), the others are there.
    let (out, err, code) = run(
        KATA,
        "devices-privileged",
        &["--privileged"],
        "test -c /dev/fuse && echo fuse; test -c /dev/net/tun && echo tun",
        "",
    );
    assert_eq!((out.as_str(), code), ("fuse\ntun\n", 0), "{err}");
    assert_no_leftovers("devices-privileged");
}
