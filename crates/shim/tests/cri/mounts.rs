//! Volumes: a direct volume shared by a pod's containers.

use super::*;

/// Whether QEMU `pid` holds `dev` open (a drive still attached).
fn qemu_holds(pid: u32, dev: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(dev)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_direct_volume_is_shared_by_a_pods_containers_and_unplugged_after_the_last() {
    let _lock = config_lock().await;
    let mut c = client().await;
    let logs = logs_dir("dv");
    remove_stale(&mut c, "kata-dv").await;
    let dir = tempfile::tempdir().expect("tmp");
    let img = common::LoopImage::new(dir.path(), "vol.img", 64, "ext4");
    let vol = dir
        .path()
        .join("kubelet/pods/uid/volumes/kubernetes.io~csi/pv1/mount");
    std::fs::create_dir_all(&vol).expect("mkdir");
    let vol = vol.display().to_string();
    let info = format!(
        r#"{{"volume-type":"block","device":"{}","fstype":"ext4"}}"#,
        img.dev
    );
    let (_, err, code) = common::kata_runtime(&[
        "direct-volume",
        "add",
        "--volume-path",
        &vol,
        "--mount-info",
        &info,
    ]);
    assert_eq!(code, 0, "{err}");
    let cfg = pod_config("kata-dv", &[], &logs);
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let qemu = qemu_of(&pod);
    assert!(
        !qemu_holds(qemu, &img.dev),
        "nothing plugged before a container asks"
    );
    let mount = || Mount {
        container_path: "/data".into(),
        host_path: vol.clone(),
        ..Default::default()
    };
    let a = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("a", &["sleep", "1000"], vec![mount()]),
    )
    .await;
    let b = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("b", &["sleep", "1000"], vec![mount()]),
    )
    .await;
    assert!(
        qemu_holds(qemu, &img.dev),
        "the volume is a drive of the pod's QEMU"
    );
    let (out, code) = exec(
        &mut c,
        &a,
        &[
            "sh",
            "-c",
            "echo shared > /data/f; sync; mount | grep ' /data '",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("on /data type ext4 (rw"), "{out}");
    let (out, code) = exec(&mut c, &b, &["cat", "/data/f"]).await;
    assert_eq!((out.as_str(), code), ("shared\n", 0));
    // stats through the pod's shim.
    let (out, err, code) = common::kata_runtime(&["direct-volume", "stats", "--volume-path", &vol]);
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(
        s["usage"][0]["total"]
            .as_u64()
            .is_some_and(|t| t > 50 << 20),
        "{s}"
    );

    // The first container goes: the volume stays for the second.
    stop_and_remove(&mut c, &a).await;
    assert!(qemu_holds(qemu, &img.dev));
    let (out, code) = exec(&mut c, &b, &["cat", "/data/f"]).await;
    assert_eq!((out.as_str(), code), ("shared\n", 0));
    // The last one goes: unmounted in the guest, unplugged from QEMU.
    stop_and_remove(&mut c, &b).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu_holds(qemu, &img.dev) {
        assert!(Instant::now() < deadline, "QEMU still holds {}", img.dev);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    remove_pod(&mut c, &pod).await;
    assert_eq!(img.read(dir.path(), "f"), "shared\n");
    let (_, err, code) = common::kata_runtime(&["direct-volume", "remove", "--volume-path", &vol]);
    assert_eq!(code, 0, "{err}");
}
