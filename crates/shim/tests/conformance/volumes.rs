//! Volumes as a kubelet mounts them: a host directory read-write both ways after start, a
//! read-only bind, a single file, a subdirectory (subPath), HostToContainer propagation of a
//! mount made on the host after start, and a memory-backed emptyDir.

use super::*;

/// A scratch host directory for `handler`'s pod, emptied first.
fn scratch(name: &str, handler: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kata-conformance-{name}-{handler}"));
    let _ = Command::new("umount").arg("-R").arg(&dir).output();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn mount(
    host: &std::path::Path,
    container: &str,
    readonly: bool,
    propagation: MountPropagation,
) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn volumes_and_propagation_as_with_runc() {
    let seen = each_handler(|handler| async move {
        let dir = scratch("vol", handler);
        let (rw, ro, sub, prop) = (
            dir.join("rw"),
            dir.join("ro"),
            dir.join("sub"),
            dir.join("prop"),
        );
        for d in [&rw, &ro, &sub.join("inner"), &prop] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(ro.join("ro-file"), "ro-content").expect("write");
        std::fs::write(dir.join("single.txt"), "single-content").expect("write");
        std::fs::write(sub.join("outside"), "not-in-the-subpath").expect("write");
        std::fs::write(sub.join("inner/inside"), "in-the-subpath").expect("write");
        // HostToContainer needs a shared (or slave) mount on the host, as the kubelet's are.
        let prop_s = prop.display().to_string();
        run(&["mount", "--bind", &prop_s, &prop_s]);
        run(&["mount", "--make-shared", &prop_s]);
        let mut pod = Pod::run(handler, "cf-vol", |_| {}).await;
        let app = pod
            .start("app", cri::IDLE, |c| {
                c.mounts = vec![
                    mount(&rw, "/rw", false, MountPropagation::PropagationPrivate),
                    mount(&ro, "/ro", true, MountPropagation::PropagationPrivate),
                    mount(
                        &dir.join("single.txt"),
                        "/etc/single.txt",
                        true,
                        MountPropagation::PropagationPrivate,
                    ),
                    mount(
                        &sub.join("inner"),
                        "/sub",
                        false,
                        MountPropagation::PropagationPrivate,
                    ),
                    mount(
                        &prop,
                        "/prop",
                        false,
                        MountPropagation::PropagationHostToContainer,
                    ),
                ];
            })
            .await;
        // The host writes after start; the container reads. The container writes; the host reads.
        std::fs::write(rw.join("from-host"), "host-content").expect("write");
        let from_host = pod.sh(&app, "cat /rw/from-host").await;
        pod.sh(&app, "echo ctr-content > /rw/from-ctr").await;
        let from_ctr = std::fs::read_to_string(rw.join("from-ctr")).unwrap_or_default();
        let (_, ro_write) = pod.exec(&app, &["touch", "/ro/x"]).await;
        let ro_read = pod.sh(&app, "cat /ro/ro-file").await;
        let single = pod.sh(&app, "cat /etc/single.txt").await;
        let subpath = pod.sh(&app, "ls /sub; cat /sub/inside").await;
        // A mount made on the host under the volume after start reaches the container.
        let late = prop.join("late");
        std::fs::create_dir_all(&late).expect("mkdir");
        let late_s = late.display().to_string();
        run(&["mount", "-t", "tmpfs", "-o", "size=1m", "late", &late_s]);
        std::fs::write(late.join("in-late-mount"), "late-content").expect("write");
        let mut propagated = String::new();
        for _ in 0..50 {
            let (out, code) = pod.exec(&app, &["cat", "/prop/late/in-late-mount"]).await;
            if code == 0 {
                propagated = out.trim().to_string();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pod.remove().await;
        let _ = Command::new("umount").arg("-R").arg(&prop).output();
        let _ = std::fs::remove_dir_all(&dir);
        (
            from_host,
            from_ctr.trim().to_string(),
            ro_write != 0,
            ro_read,
            single,
            subpath,
            propagated,
        )
    })
    .await;
    assert_eq!(
        seen["runc"],
        (
            "host-content".to_string(),
            "ctr-content".to_string(),
            true,
            "ro-content".to_string(),
            "single-content".to_string(),
            "inside\nin-the-subpath".to_string(),
            "late-content".to_string()
        ),
        "the oracle"
    );
    assert_same("volumes", &seen);
}

/// What a memory-backed emptyDir and a Bidirectional volume gave one handler.
#[derive(Debug, PartialEq)]
struct Special {
    /// `df -k` of the emptyDir: its size in KiB.
    empty_dir_kib: u64,
    /// Writing past the size limit failed.
    over_limit_fails: bool,
    /// The pod's second container sees the first one's file in the emptyDir.
    shared_in_pod: String,
    /// A mount the privileged container made under its Bidirectional volume, seen inside it.
    bidi_inside: String,
    /// ... and on the host.
    bidi_on_host: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn memory_backed_empty_dir_and_bidirectional_propagation() {
    let seen = each_handler(|handler| async move {
        let dir = scratch("special", handler);
        // The kubelet mounts a `medium: Memory` emptyDir as a tmpfs with the size limit.
        let mem = dir.join("pods/u1/volumes/kubernetes.io~empty-dir/mem");
        std::fs::create_dir_all(&mem).expect("mkdir");
        let mem_s = mem.display().to_string();
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=16m",
            "kata-test",
            &mem_s,
        ]);
        let bidi = dir.join("bidi");
        std::fs::create_dir_all(bidi.join("inner")).expect("mkdir");
        let bidi_s = bidi.display().to_string();
        run(&["mount", "--bind", &bidi_s, &bidi_s]);
        run(&["mount", "--make-shared", &bidi_s]);
        let mut pod = Pod::run(handler, "cf-vol2", privileged_pod).await;
        let empty_dir = |c: &mut ContainerConfig| {
            c.mounts.push(mount(
                &mem,
                "/cache",
                false,
                MountPropagation::PropagationPrivate,
            ));
        };
        let app = pod
            .start("app", cri::IDLE, |c| {
                empty_dir(c);
                c.mounts.push(mount(
                    &bidi,
                    "/bidi",
                    false,
                    MountPropagation::PropagationBidirectional,
                ));
                security(c).privileged = true;
            })
            .await;
        let other = pod.start("other", cri::IDLE, empty_dir).await;
        let empty_dir_kib = pod
            .sh(&app, "df -k /cache | tail -1 | awk '{print $2}'")
            .await
            .parse()
            .unwrap_or(0);
        let (_, code) = pod
            .exec(
                &app,
                &["sh", "-c", "head -c 20971520 /dev/zero > /cache/big"],
            )
            .await;
        pod.sh(&app, "rm -f /cache/big; echo from-app > /cache/shared")
            .await;
        let shared_in_pod = pod.sh(&other, "cat /cache/shared").await;
        pod.sh(
            &app,
            "mount -t tmpfs -o size=1m made-inside /bidi/inner && echo in > /bidi/inner/f",
        )
        .await;
        let bidi_inside = pod.sh(&app, "cat /bidi/inner/f").await;
        let bidi_on_host = bidi.join("inner/f").exists();
        pod.remove().await;
        let _ = Command::new("umount").arg("-R").arg(&bidi).output();
        let _ = Command::new("umount").arg(&mem).output();
        let _ = std::fs::remove_dir_all(&dir);
        Special {
            empty_dir_kib,
            over_limit_fails: code != 0,
            shared_in_pod,
            bidi_inside,
            bidi_on_host,
        }
    })
    .await;
    assert_eq!(
        seen["runc"],
        Special {
            empty_dir_kib: 16384,
            over_limit_fails: true,
            shared_in_pod: "from-app".into(),
            bidi_inside: "in".into(),
            bidi_on_host: true,
        },
        "the oracle"
    );
    // By design, a mount made in the guest cannot appear on the host: the VM is the boundary.
    // Everything else is runc's.
    assert_eq!(
        seen["kata"],
        Special {
            bidi_on_host: false,
            ..Special {
                empty_dir_kib: 16384,
                over_limit_fails: true,
                shared_in_pod: "from-app".into(),
                bidi_inside: "in".into(),
                bidi_on_host: true,
            }
        },
        "kata"
    );
}
