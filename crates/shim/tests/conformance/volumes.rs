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
