//! The guest: a pod on the initrd behaves as on the rootfs image.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_on_the_initrd_serves_tcp_and_execs_as_on_the_image() {
    // The suite runs on the shipped root, the rootfs image; this pod boots the initrd instead.
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let drop_in = write_drop_in(
        "90-test-initrd.toml",
        "[hypervisor.qemu]\nimage = \"\"\ninitrd = \"/opt/kata/share/kata-containers/kata-containers-initrd.img\"\n",
    );
    let (pod, ip) = web_pod(&mut c, "kata-initrd", &[]).await;
    let _ = std::fs::remove_file(&drop_in);
    let qemu = qemu_of(&pod);
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains(" -initrd ") && !argv.contains("nvdimm"),
        "{argv}"
    );
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let probe = start_probe(&mut c, &pod).await;
    let (cmdline, code) = exec(&mut c, &probe, &["cat", "/proc/cmdline"]).await;
    assert_eq!(code, 0);
    assert!(!cmdline.contains("root="), "{cmdline}");
    // Out of the VM, through the pod's network, to the bridge.
    download_into(&mut c, &probe).await;
    // The pod's own network namespace (where its tap is) goes with it. Other tests' pods may
    // run meanwhile, so only this pod's namespace is looked at.
    let named = named_netns_of(qemu);
    remove_pod(&mut c, &pod).await;
    assert_pod_gone(&pod);
    assert!(!named.exists(), "{} left", named.display());
}
