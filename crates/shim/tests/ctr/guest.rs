//! The guest: the VM and its kernel, the rootfs image or the initrd, guest hooks, Kata 3.0's own
//! configuration.

use super::*;

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn runs_in_a_vm_with_the_guest_kernel() {
    let (out, err, code) = run(KATA, "vm-kernel", &[], "uname -r", "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        common::guest_kernel_release(),
        "the container runs on the guest kernel, not the host's"
    );
    assert_ne!(out.trim(), kata_hypervisor::host::kernel_release());
    assert_no_leftovers("vm-kernel");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn guest_hooks_run_in_the_guest() {
    // An initrd with hooks under /usr/share/oci/hooks (kata-guest-image --add-tree), and a
    // configuration pointing guest_hook_path there.
    let dir = tempfile::tempdir().expect("tmp");
    let hooks = dir.path().join("hooks");
    let script = "#!/bin/sh\n\
        s=$(/bin/busybox cat)\n\
        b=$(echo \"$s\" | /bin/busybox sed 's/.*\"bundle\":\"\\([^\"]*\\)\".*/\\1/')\n\
        st=$(echo \"$s\" | /bin/busybox sed 's/.*\"status\":\"\\([a-z]*\\)\".*/\\1/')\n\
        echo \"$1 $st $(/bin/busybox uname -r)\" >> \"$b/rootfs/hooks.log\"\n";
    for kind in ["prestart", "poststart", "poststop"] {
        std::fs::create_dir_all(hooks.join(kind)).expect("mkdir");
        let p = hooks.join(kind).join("10-log");
        std::fs::write(&p, script).expect("hook");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    // The guest's root as shipped (the rootfs image or the initrd), with the hooks in it.
    let root = shipped_root();
    let (name, format) = match root {
        Root::Initrd => ("initrd-with-hooks.img", "initrd"),
        _ => ("image-with-hooks.img", "image"),
    };
    let file = dir.path().join(name);
    let st = Command::new(common::repo().join("target/release/kata-guest-image"))
        .arg("--agent")
        .arg(common::repo().join("build/kata-agent"))
        .args([
            "--busybox",
            "/bin/busybox",
            "--format",
            format,
            "--add-tree",
        ])
        .arg(format!("{}:/usr/share/oci/hooks", hooks.display()))
        .arg("--output")
        .arg(&file)
        .stdout(Stdio::null())
        .status()
        .expect("kata-guest-image");
    assert!(st.success());
    let cfg = dir.path().join("configuration-hooks.toml");
    std::fs::write(
        &cfg,
        configuration(
            root,
            Some(&file),
            &[("guest_hook_path", "\"/usr/share/oci/hooks\"")],
        ),
    )
    .expect("config");
    // The process starts after prestart; poststart may or may not have run by then.
    let spec = spec_file(
        dir.path(),
        &["/bin/sh", "-c", "head -n 1 /hooks.log"],
        |s| s["linux"]["cgroupsPath"] = serde_json::json!("/default/guest-hooks"),
    );
    let cfg = cfg.display().to_string();
    let out = ctr(&[
        "run",
        "--runtime",
        KATA,
        "--rm",
        "--runtime-config-path",
        &cfg,
        "--config",
        &spec,
        "guest-hooks",
    ]);
    let release = common::guest_kernel_release();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("prestart created {release}\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rootfs/hooks.log")).expect("hooks ran"),
        format!(
            "prestart created {release}\npoststart running {release}\npoststop stopped {release}\n"
        ),
        "the guest ran the three hooks, in the guest's kernel"
    );
    assert_no_leftovers("guest-hooks");
}

fn sha256(path: &str) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn the_guest_boots_from_the_image_or_the_initrd_alike() {
    let dir = tempfile::tempdir().expect("tmp");
    for (root, tag, param) in [
        (Root::ImageNvdimm, "nvdimm", "root=/dev/pmem0p1"),
        (Root::ImageBlock, "blk", "root=/dev/vda1"),
        (Root::Initrd, "initrd", ""),
    ] {
        let cfg = configuration_file(dir.path(), root, None, &[]);
        let rc = ["--runtime-config-path", cfg.as_str()];
        // Output, stderr and the exit code; the kernel's root.
        let script =
            "cat /proc/cmdline; grep MemTotal /proc/meminfo; echo out; echo err >&2; exit 3";
        let (out, err, code) = run(KATA, &format!("root-{tag}"), &rc, script, "");
        assert_eq!(code, 3, "{root:?}: {err}");
        assert!(
            out.ends_with("out\n") && err.contains("err"),
            "{root:?}: {out} {err}"
        );
        let cmdline = out.lines().next().unwrap_or("");
        if param.is_empty() {
            assert!(!cmdline.contains("root="), "{root:?}: {cmdline}");
        } else {
            assert!(
                cmdline.contains(param) && cmdline.contains(" ro "),
                "{root:?}: {cmdline}"
            );
        }
        assert_no_leftovers(&format!("root-{tag}"));
        // --memory-limit grows the VM by the limit.
        let limited = [
            "--runtime-config-path",
            cfg.as_str(),
            "--memory-limit",
            "536870912",
        ];
        let (more, err, code) = run(KATA, &format!("root-{tag}-mem"), &limited, script, "");
        assert_eq!(code, 3, "{root:?}: {err}");
        let (a, b) = (mem_total_mib(&out), mem_total_mib(&more));
        assert!(
            b >= a + 500 && b <= a + 520,
            "{root:?}: VM memory {a} MiB -> {b} MiB with a 512 MiB limit"
        );
        assert_no_leftovers(&format!("root-{tag}-mem"));
        // exec, with the QEMU devices of the mode.
        let id = format!("root-{tag}-exec");
        force_remove(&id);
        run_detached(KATA, &id, &rc, &["sleep", "1000"]);
        let qemu = common::pid_with(&format!("sandbox-{id} ")).expect("QEMU runs");
        let argv = String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{qemu}/cmdline")).expect("cmdline"),
        )
        .replace('\0', " ");
        match root {
            Root::ImageNvdimm => assert!(
                argv.contains("nvdimm,id=nv0,memdev=mem-nv0,unarmed=on")
                    && argv.contains("readonly=on,share=on"),
                "{argv}"
            ),
            Root::ImageBlock => assert!(
                argv.contains("format=raw,readonly=on")
                    && argv.contains("virtio-blk-pci,drive=image0"),
                "{argv}"
            ),
            Root::Initrd => assert!(
                argv.contains(" -initrd ") && !argv.contains("nvdimm"),
                "{argv}"
            ),
        }
        let e = ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "echo exec-out; exit 5",
        ]);
        assert_eq!(String::from_utf8_lossy(&e.stdout), "exec-out\n", "{root:?}");
        assert_eq!(e.status.code(), Some(5), "{root:?}");
        kill_and_remove(&id);
        assert_no_leftovers(&id);
    }
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn the_image_is_read_only_to_the_guest_and_unchanged_on_the_host() {
    let _ = socket();
    let dir = tempfile::tempdir().expect("tmp");
    let image = std::fs::canonicalize(format!("{ASSETS}/kata-containers.img"))
        .expect("make install installs the image")
        .display()
        .to_string();
    let before = sha256(&image);
    for (root, tag, dev, part) in [
        (Root::ImageNvdimm, "nvdimm", "/dev/pmem0", "/dev/pmem0p1"),
        (Root::ImageBlock, "blk", "/dev/vda", "/dev/vda1"),
    ] {
        let cfg = configuration_file(dir.path(), root, None, &[("debug_console_enabled", "true")]);
        let id = format!("ro-image-{tag}");
        force_remove(&id);
        run_detached(
            KATA,
            &id,
            &["--runtime-config-path", &cfg],
            &["sleep", "1000"],
        );
        // A root shell in the guest (the debug console) tries every way to write the image.
        let script = format!(
            "grep ' / ' /proc/mounts\n\
             touch /probe && echo WROTE-ROOT\n\
             mount -o remount,rw / && echo REMOUNTED-RW\n\
             blockdev --setrw {dev}; dd if=/dev/zero of={dev} bs=4096 count=8 seek=768 conv=fsync && echo WROTE-DEVICE\n\
             blockdev --setrw {part}; dd if=/dev/zero of={part} bs=4096 count=8 conv=fsync && echo WROTE-PARTITION\n\
             echo done-trying\n\
             exit 0\n"
        );
        let (out, _, _) = common::kata_runtime_with_input(&["exec", &id], script.as_bytes());
        let text = out.replace('\r', "");
        assert!(text.contains("done-trying"), "{root:?}: {text}");
        let mounts = text
            .lines()
            .find(|l| l.starts_with("/dev/root / ext4 "))
            .unwrap_or_else(|| panic!("{root:?}: no root mount in {text}"));
        assert!(
            mounts.contains(" ro,") || mounts.contains(" ro "),
            "{mounts}"
        );
        if root == Root::ImageNvdimm {
            assert!(
                mounts.contains("dax"),
                "the guest runs from the image with DAX: {mounts}"
            );
        }
        for marker in [
            "WROTE-ROOT",
            "REMOUNTED-RW",
            "WROTE-DEVICE",
            "WROTE-PARTITION",
        ] {
            assert!(
                !text.lines().any(|l| l == marker),
                "{root:?}: the guest could write ({marker}): {text}"
            );
        }
        kill_and_remove(&id);
        assert_no_leftovers(&id);
        assert_eq!(
            sha256(&image),
            before,
            "{root:?}: the image file on the host changed"
        );
    }
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn kata_3_0_configuration_runs_unchanged() {
    // Kata 3.0.0's own configuration-qemu.toml, byte for byte: the rootfs image, Kata's paths.
    let kata = common::repo().join("crates/config/tests/data/kata-3.0.0/configuration-qemu.toml");
    let text = std::fs::read_to_string(&kata).expect("Kata's file");
    assert!(text.contains("image = \"/opt/kata/share/kata-containers/kata-containers.img\""));
    let cfg = kata.display().to_string();
    let (out, err, code) = run(
        KATA,
        "kata-3-0-config",
        &["--runtime-config-path", &cfg],
        "free -h; grep -o 'root=[^ ]*' /proc/cmdline",
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Mem:") && out.contains("root=/dev/pmem0p1"),
        "{out}"
    );
    assert_no_leftovers("kata-3-0-config");
}
