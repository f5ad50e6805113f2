//! What a container sees of the host: bind mounts, read-only volumes, image symlinks, the share and
//! virtiofsd, direct volumes.

use super::*;

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn bind_mounts_match_runc_and_read_only_is_enforced() {
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        let dir = tempfile::tempdir().expect("tmp");
        let ro = dir.path().join("ro");
        let rw = dir.path().join("rw");
        std::fs::create_dir_all(&ro).expect("mkdir");
        std::fs::create_dir_all(&rw).expect("mkdir");
        std::fs::write(ro.join("file"), "from the host\n").expect("write");
        let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
        let rw_mount = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
        let script = "cat /ro/file; touch /ro/new 2>/dev/null && echo ro-writable || echo ro-refused; echo from-guest > /rw/out && echo rw-ok";
        let (out, err, code) = run(
            runtime,
            &format!("bind-{tag}"),
            &["--mount", &ro_mount, "--mount", &rw_mount],
            script,
            "",
        );
        assert_eq!(
            (out.as_str(), code),
            ("from the host\nro-refused\nrw-ok\n", 0),
            "{runtime}: {err}"
        );
        assert_eq!(
            std::fs::read_to_string(rw.join("out")).expect("written through"),
            "from-guest\n",
            "{runtime}"
        );
        assert!(!ro.join("new").exists(), "{runtime}");
    }
    assert_no_leftovers("bind-kata");
}

const HOSTILE: &str = "kata.local/hostile:latest";

/// An image whose symlinks point out of it: to `/`, up a `..` chain, and to the magic
/// `/proc/self/root`.
fn hostile_image() -> &'static str {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        common::import_image_with_symlinks(
            socket(),
            HOSTILE,
            &[
                ("escape", "/"),
                ("dots", "../../../../../.."),
                ("procroot", "/proc/self/root"),
            ],
        )
    });
    HOSTILE
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn image_symlinks_never_lead_a_mount_out_of_the_container() {
    let vol = tempfile::tempdir().expect("tmp");
    std::fs::write(vol.path().join("marker"), "volume\n").expect("write");
    let src = vol.path().display().to_string();
    let via_root = format!("type=bind,src={src},dst=/escape/x,options=rbind:rw");
    let via_dots = format!("type=bind,src={src},dst=/dots/a/../y,options=rbind:ro");
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        // runc is the oracle: the mounts land at /x and /y inside the container.
        let (out, err, code) = run_image(
            runtime,
            hostile_image(),
            &format!("symlink-{tag}"),
            &["--mount", &via_root, "--mount", &via_dots],
            "cat /x/marker /y/marker; readlink /escape; ls /dots/x/marker",
            "",
        );
        assert_eq!(
            (out.as_str(), code),
            ("volume\nvolume\n/\n/dots/x/marker\n", 0),
            "{runtime}: {err}"
        );
    }
    assert_no_leftovers("symlink-kata");
    // Through the magic link (the container's /proc is mounted by then): refused with the
    // path named, before anything is made. (Not tried with runc: its mkdir of the mount point
    // may follow it on the host.)
    let magic = format!("type=bind,src={src},dst=/procroot/etc/kata-escape,options=rbind");
    let (_, err, code) = run_image(
        KATA,
        hostile_image(),
        "symlink-magic",
        &["--mount", &magic],
        "true",
        "",
    );
    assert_ne!(code, 0);
    assert!(err.contains("/procroot"), "{err}");
    assert!(!std::path::Path::new("/etc/kata-escape").exists());
    assert_no_leftovers("symlink-magic");
    let left: Vec<_> = std::fs::read_dir(vol.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["marker"], "the volume is unchanged");
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn read_only_volumes_match_runc_recursively() {
    let vol = tempfile::tempdir().expect("tmp");
    let sub = vol.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&sub)
        .status()
        .expect("mount");
    assert!(st.success());
    let src = vol.path().display().to_string();
    let ro = format!("type=bind,src={src},dst=/ro,options=rbind:ro");
    let rro = format!("type=bind,src={src},dst=/rro,options=rbind:rro");
    let script = "for p in /ro /ro/sub /rro /rro/sub; do touch $p/f-$$ 2>/dev/null && echo \"$p writable\" && rm $p/f-$$ || echo \"$p refused\"; done";
    for runtime in [KATA, RUNC] {
        let tag = if runtime == KATA { "kata" } else { "runc" };
        let (out, err, code) = run(
            runtime,
            &format!("rro-{tag}"),
            &["--mount", &ro, "--mount", &rro],
            script,
            "",
        );
        // runc: ro is the top only (runc 1.1 and the OCI spec), rro every submount. Kata: the
        // same, except that a volume's submount under a plain ro is read-only too: the guest
        // sees it as a virtio-fs automount, and the kernel gives an automount its parent's
        // flags. Stricter than runc, never more writable (docs/security.md).
        let sub = if runtime == KATA {
            "refused"
        } else {
            "writable"
        };
        assert_eq!(
            (out, code),
            (
                format!("/ro refused\n/ro/sub {sub}\n/rro refused\n/rro/sub refused\n"),
                0
            ),
            "{runtime}: {err}"
        );
    }
    assert_no_leftovers("rro-kata");
    // An option a bind mount cannot honour is an error naming it, never dropped.
    let bad = format!("type=bind,src={src},dst=/bad,options=rbind:ro:size=1m");
    let (_, err, code) = run(KATA, "rro-bad", &["--mount", &bad], "true", "");
    assert_ne!(code, 0);
    assert!(
        err.contains("\"size=1m\"") && err.contains("bind mount"),
        "{err}"
    );
    assert_no_leftovers("rro-bad");
    let _ = Command::new("umount").arg(&sub).status();
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn virtiofsd_is_confined_and_the_top_of_the_share_is_read_only() {
    let id = "vfsd-confined";
    // Privileged: the container is root in the guest with every capability.
    run_detached(KATA, id, &["--privileged"], &["sleep", "1000"]);
    let share = std::path::PathBuf::from(format!("/run/kata-containers/shared/sandboxes/{id}"));
    let census = || -> Vec<String> {
        let mut names = Vec::new();
        for top in [
            "",
            "mounts",
            "shared",
            &format!("mounts/{id}"),
            &format!("shared/{id}"),
        ] {
            for e in std::fs::read_dir(share.join(top))
                .into_iter()
                .flatten()
                .flatten()
            {
                names.push(format!("{top}/{}", e.file_name().to_string_lossy()));
            }
        }
        names.sort();
        names
    };
    let before = census();
    let sock = format!("/run/vc/vm/{id}/vfsd.sock");
    let ours = std::fs::read_link("/proc/self/ns/mnt").expect("ns");
    let ours_pid = std::fs::read_link("/proc/self/ns/pid").expect("ns");
    let mut workers = 0;
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.starts_with("/opt/kata/libexec/virtiofsd") || !cmd.contains(&sock) {
            continue;
        }
        assert!(
            cmd.contains("--sandbox namespace") && cmd.contains("--seccomp kill"),
            "{cmd}"
        );
        let mnt = std::fs::read_link(e.path().join("ns/mnt")).expect("ns");
        assert_ne!(mnt, ours, "virtiofsd has its own mount namespace");
        if std::fs::read_link(e.path().join("ns/pid")).expect("ns") == ours_pid {
            continue; // the parent, which only waits for the worker
        }
        workers += 1;
        let status = std::fs::read_to_string(e.path().join("status")).expect("status");
        assert!(status.contains("Seccomp:\t2"), "{status}");
        // Its root is the sandbox's export: a read-only view.
        let mountinfo = std::fs::read_to_string(e.path().join("mountinfo")).expect("mountinfo");
        let root = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .expect("a / mount");
        assert!(
            root.contains(&format!(
                "/run/kata-containers/shared/sandboxes/{id}/mounts / ro,"
            )),
            "{root}"
        );
    }
    assert_eq!(workers, 1, "one confined virtiofsd worker");
    // On the host, the export's top refuses writes; the container's root filesystem inside it
    // does not.
    let export =
        std::path::PathBuf::from(format!("/run/kata-containers/shared/sandboxes/{id}/shared"));
    let e = std::fs::write(export.join("evil"), "x").expect_err("read-only");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "w",
        id,
        "sh",
        "-c",
        "echo x > /written && cat /written",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n");
    assert!(export.join(id).join("rootfs/written").exists());
    // The privileged container, root in the guest, mounts the share again and tries to write
    // above its root filesystem and at the top: whatever the guest reaches is its own root
    // filesystem; the host's share is unchanged (the container's own written file aside).
    let attack = "mkdir -p /mnt/s && mount -t virtiofs kataShared /mnt/s; \
                  for p in /mnt/s /mnt/s/.. /mnt/s/../.. /run/kata-containers/shared/containers; do \
                  touch $p/evil 2>/dev/null; ln -s / $p/evil-link 2>/dev/null; mkdir $p/evil-dir 2>/dev/null; done; true";
    let out = ctr(&["task", "exec", "--exec-id", "a", id, "sh", "-c", attack]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        census(),
        {
            let mut b = before.clone();
            b.sort();
            b
        },
        "the share's top is unchanged"
    );
    for d in [share.join("mounts"), share.join("shared"), share.clone()] {
        assert!(!d.join("evil").exists() && !d.join("evil-link").exists());
    }
    kill_and_remove(id);
    assert_no_leftovers(id);
}

/// (blocks × block size, inodes) of a path in the container, from `stat -f`.
fn statfs_in(id: &str, exec_id: &str, path: &str) -> (u64, u64) {
    let (out, err, code) = exec_in(id, exec_id, &format!("stat -f -c '%b %S %c' {path}"));
    assert_eq!(code, 0, "{err}");
    let v: Vec<u64> = out
        .split_whitespace()
        .map(|x| x.parse().expect("number"))
        .collect();
    (v[0] * v[1], v[2])
}

fn volume_stats(volume: &str) -> serde_json::Value {
    let (out, err, code) =
        common::kata_runtime(&["direct-volume", "stats", "--volume-path", volume]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("stats JSON")
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install"]
fn direct_volumes_are_hot_plugged_block_devices() {
    let _ = socket();
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let ext4 = common::LoopImage::new(d, "ext4.img", 64, "ext4");
    let xfs = common::LoopImage::new(d, "xfs.img", 320, "xfs");
    let ro = common::LoopImage::new(d, "ro.img", 32, "ext4");
    let vol = |n: &str| {
        let p = d.join("vols").join(n);
        std::fs::create_dir_all(&p).expect("mkdir");
        p.display().to_string()
    };
    let (ve, vx, vr) = (vol("e"), vol("x"), vol("r"));
    for (v, info) in [
        (
            &ve,
            format!(
                r#"{{"volume-type":"block","device":"{}","fstype":"ext4"}}"#,
                ext4.dev
            ),
        ),
        (
            &vx,
            format!(
                r#"{{"volume-type":"block","device":"{}","fstype":"xfs"}}"#,
                xfs.dev
            ),
        ),
        (
            &vr,
            format!(
                r#"{{"Device":"{}","FsType":"ext4","options":["ro"]}}"#,
                ro.dev
            ),
        ),
    ] {
        let (_, err, code) = common::kata_runtime(&[
            "direct-volume",
            "add",
            "--volume-path",
            v,
            "--mount-info",
            &info,
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let id = "direct-volumes";
    force_remove(id);
    let m = |src: &str, dst: &str| format!("type=bind,src={src},dst={dst},options=rbind:rw");
    let (me, mx, mr) = (m(&ve, "/e"), m(&vx, "/x"), m(&vr, "/r"));
    run_detached(
        KATA,
        id,
        &["--mount", &me, "--mount", &mx, "--mount", &mr],
        &["sleep", "1000"],
    );
    // The default driver is virtio-scsi: SCSI disks, each with its filesystem.
    let (out, err, code) = exec_in(
        id,
        "w",
        "mount | grep -E ' /(e|x|r) '; echo hello > /e/f; echo hi > /x/f; touch /r/f 2>&1 || echo RO-REFUSED; sync",
    );
    assert_eq!(code, 0, "{err}");
    for want in [
        "on /e type ext4 (rw",
        "on /x type xfs (rw",
        "on /r type ext4 (ro",
        "Read-only file system",
        "RO-REFUSED",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    assert_eq!(out.matches("/dev/sd").count(), 3, "{out}");
    // The sandbox is recorded beside the mount info, as Kata's Go runtime does.
    let record = format!(
        "/run/kata-containers/shared/direct-volumes/{}",
        kata_sandbox::direct_volume::encode(&ve)
    );
    assert!(std::path::Path::new(&record).join(id).exists());

    // stats: statfs in the guest, as df sees it in the container.
    for (v, path) in [(&ve, "/e"), (&vx, "/x")] {
        let (bytes, inodes) = statfs_in(id, "s", path);
        let s = volume_stats(v);
        assert_eq!(s["usage"][0]["unit"], 1, "{s}");
        assert_eq!(s["usage"][0]["total"].as_u64(), Some(bytes), "{s}");
        assert_eq!(s["usage"][1]["unit"], 2, "{s}");
        assert_eq!(s["usage"][1]["total"].as_u64(), Some(inodes), "{s}");
        assert_eq!(s["volume_condition"]["message"], "OK", "{s}");
    }

    // resize: the host device grows, then the volume and its filesystem, online.
    for (img, v, path, mib) in [(&ext4, &ve, "/e", 128u64), (&xfs, &vx, "/x", 640)] {
        let (before, _) = statfs_in(id, "b", path);
        img.grow(mib);
        let size = (mib << 20).to_string();
        let (_, err, code) = common::kata_runtime(&[
            "direct-volume",
            "resize",
            "--volume-path",
            v,
            "--size",
            &size,
        ]);
        assert_eq!(code, 0, "{err}");
        let (after, _) = statfs_in(id, "a", path);
        assert!(after > before * 18 / 10, "{path}: {before} -> {after}");
    }
    let (_, err, code) = common::kata_runtime(&[
        "direct-volume",
        "resize",
        "--volume-path",
        &ve,
        "--size",
        "4096",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("shrinking is not supported"), "{err}");
    let (out, _, _) = exec_in(id, "c", "cat /e/f /x/f");
    assert_eq!(out, "hello\nhi\n");
    kill_and_remove(id);
    assert_no_leftovers(id);
    // Nothing lost: the files are on the devices.
    assert_eq!(ext4.read(d, "f"), "hello\n");
    assert_eq!(xfs.read(d, "f"), "hi\n");

    // virtio-blk: a PCI disk found by its PCI path.
    let shipped =
        std::fs::read_to_string("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
            .expect("shipped configuration");
    assert!(shipped.contains("\nblock_device_driver = \"virtio-scsi\"\n"));
    let blk = d.join("configuration-blk.toml");
    std::fs::write(
        &blk,
        shipped.replace(
            "\nblock_device_driver = \"virtio-scsi\"\n",
            "\nblock_device_driver = \"virtio-blk\"\n",
        ),
    )
    .expect("config");
    let blk = blk.display().to_string();
    let (out, err, code) = run(
        KATA,
        "direct-volume-blk",
        &["--runtime-config-path", &blk, "--mount", &me],
        "mount | grep ' /e '; cat /e/f; echo again >> /e/f",
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("/dev/vda on /e type ext4 (rw"), "{out}");
    assert!(out.contains("hello"), "{out}");
    assert_no_leftovers("direct-volume-blk");
    assert_eq!(ext4.read(d, "f"), "hello\nagain\n");

    // Errors: a malformed mountInfo.json names the key; a missing device names the device.
    let bad = vol("bad");
    let bad_dir = format!(
        "/run/kata-containers/shared/direct-volumes/{}",
        kata_sandbox::direct_volume::encode(&bad)
    );
    std::fs::create_dir_all(&bad_dir).expect("mkdir");
    std::fs::write(
        format!("{bad_dir}/mountInfo.json"),
        r#"{"device":"/dev/loop0"}"#,
    )
    .expect("write");
    let mb = m(&bad, "/b");
    let (_, err, code) = run(KATA, "direct-volume-bad", &["--mount", &mb], "true", "");
    assert_ne!(code, 0);
    assert!(
        err.contains("key \\\"fstype\\\" is missing") || err.contains("key \"fstype\" is missing"),
        "{err}"
    );
    assert_no_leftovers("direct-volume-bad");
    let (_, err, code) = common::kata_runtime(&[
        "direct-volume",
        "add",
        "--volume-path",
        &bad,
        "--mount-info",
        r#"{"device":"/dev/no-such-kata-test-device","fstype":"ext4"}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, err, code) = run(KATA, "direct-volume-bad", &["--mount", &mb], "true", "");
    assert_ne!(code, 0);
    assert!(err.contains("/dev/no-such-kata-test-device"), "{err}");
    assert_no_leftovers("direct-volume-bad");
    for v in [&ve, &vx, &vr, &bad] {
        let (_, err, code) = common::kata_runtime(&["direct-volume", "remove", "--volume-path", v]);
        assert_eq!(code, 0, "{err}");
    }
    let (_, err, code) = common::kata_runtime(&["direct-volume", "stats", "--volume-path", &ve]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a direct volume"), "{err}");
}
