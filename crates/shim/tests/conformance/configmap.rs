//! ConfigMap and Secret updates as the kubelet makes them: a new timestamped directory, the
//! `..data` symlink swapped to it by a rename, the old directory removed. The running container
//! reads the new content, and a process watching the volume with inotify gets the event.

use super::*;

/// The kubelet's atomic writer: `files` in a new directory `stamp`, `..data` swapped to it, the
/// user-visible links made once, the previous directory removed.
fn kubelet_write(dir: &std::path::Path, stamp: &str, files: &[(&str, &str)]) {
    let old = std::fs::read_link(dir.join("..data")).ok();
    let ts = dir.join(stamp);
    std::fs::create_dir_all(&ts).expect("mkdir");
    for (k, v) in files {
        std::fs::write(ts.join(k), v).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(stamp, &tmp).expect("ln");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for (k, _) in files {
        let _ = std::os::unix::fs::symlink(format!("..data/{k}"), dir.join(k));
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("remove the old directory");
    }
}

/// What one handler's container saw.
#[derive(Debug, PartialEq)]
struct Seen {
    before: String,
    after: String,
    /// The inotify watcher saw `..data` arrive (a MOVED_TO or CREATE of it) after the update.
    data_event: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn configmap_updates_reach_the_container_with_inotify_events() {
    let image = tools_image();
    let seen = each_handler(|handler| {
        let image = image.clone();
        async move {
            let base = std::env::temp_dir().join(format!("kata-conformance-cm-{handler}"));
            let _ = std::fs::remove_dir_all(&base);
            let dir = base.join("pods/u1/volumes/kubernetes.io~configmap/cfg");
            std::fs::create_dir_all(&dir).expect("mkdir");
            kubelet_write(&dir, "..2026_12_05_10_00_00.1", &[("key", "one")]);
            let mut pod = Pod::run(handler, "cf-cm", |_| {}).await;
            let app = pod
                .start(
                    "app",
                    &[
                        "sh",
                        "-c",
                        "inotify-watch /etc/cfg > /tmp/events 2>&1 & exec sleep 3600",
                    ],
                    |c| {
                        c.image = Some(ImageSpec {
                            image: image.clone(),
                            ..Default::default()
                        });
                        c.mounts = vec![Mount {
                            container_path: "/etc/cfg".into(),
                            host_path: dir.display().to_string(),
                            readonly: true,
                            ..Default::default()
                        }];
                    },
                )
                .await;
            let deadline = Instant::now() + Duration::from_secs(20);
            // The file appears when the container's shell has started the watcher, which may
            // be after the first look.
            while pod.sh(&app, "cat /tmp/events 2>/dev/null || true").await != "ready" {
                assert!(
                    Instant::now() < deadline,
                    "{handler}: the watcher never started"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let before = pod.sh(&app, "cat /etc/cfg/key").await;
            let t = Instant::now();
            kubelet_write(&dir, "..2026_12_05_10_01_00.2", &[("key", "two")]);
            let mut after = before.clone();
            while after == before && t.elapsed() < Duration::from_secs(10) {
                after = pod.sh(&app, "cat /etc/cfg/key").await;
            }
            let latency = t.elapsed();
            // The event may trail the content by a poll.
            let mut events = String::new();
            while t.elapsed() < Duration::from_secs(10) {
                events = pod.sh(&app, "cat /tmp/events").await;
                if events
                    .lines()
                    .any(|l| l == "MOVED_TO ..data" || l == "CREATE ..data")
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("{handler}: events after the update:\n{events}");
            let data_event = events
                .lines()
                .any(|l| l == "MOVED_TO ..data" || l == "CREATE ..data");
            pod.remove().await;
            let _ = std::fs::remove_dir_all(&base);
            (
                Seen {
                    before,
                    after,
                    data_event,
                },
                latency,
            )
        }
    })
    .await;
    let latency: BTreeMap<_, _> = seen.iter().map(|(h, (_, d))| (*h, *d)).collect();
    let seen: BTreeMap<_, _> = seen.into_iter().map(|(h, (s, _))| (h, s)).collect();
    eprintln!(
        "ConfigMap update seen in the container after (an ExecSync poll each ~100 ms): {latency:?}"
    );
    assert_eq!(
        seen.get("runc"),
        Some(&Seen {
            before: "one".into(),
            after: "two".into(),
            data_event: true
        }),
        "the oracle"
    );
    assert_same("a ConfigMap update", &seen);
}
