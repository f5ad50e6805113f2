//! The VM factory: templated and cached pods behave as cold ones.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_templated_pod_serves_tcp_and_execs_as_a_cold_one() {
    // VM templating: the pod's VM is cloned from a template the first sandbox creates, and gets
    // its NIC by hot-plug.
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let template = "/run/vc/vm/it-cri-template";
    let factory_toml = format!(
        "[hypervisor.qemu]\nimage = \"\"\ninitrd = \"/opt/kata/share/kata-containers/kata-containers-initrd.img\"\nshared_fs = \"virtio-9p\"\nreclaim_guest_freed_memory = false\n[factory]\nenable_template = true\ntemplate_path = \"{template}\"\n"
    );
    let drop_in = write_drop_in("90-test-template.toml", &factory_toml);
    let (out, _, _) = common::kata_runtime(&["factory", "destroy"]);
    assert_eq!(out, "vm factory destroyed\n");
    let started = web_pod(&mut c, "kata-template", &[]).await;
    let (status, _, _) = common::kata_runtime(&["factory", "status"]);
    let _ = std::fs::remove_file(&drop_in);
    let (pod, ip) = started;
    assert_eq!(
        status, "vm factory is on\n",
        "the first sandbox created the template"
    );
    let qemu = qemu_of(&pod);
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains("-incoming defer")
            && argv.contains(&format!("mem-path={template}/memory,share=off"))
            && !argv.contains("virtio-net-pci"),
        "a clone, with no NIC on its command line: {argv}"
    );
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let probe = start_probe(&mut c, &pod).await;
    assert_guest_clock_is_the_hosts(&mut c, &probe).await;
    download_into(&mut c, &probe).await;
    remove_pod(&mut c, &pod).await;
    assert_pod_gone(&pod);
    // The template outlives its clones until it is destroyed.
    assert!(Path::new(template).join("memory").exists());
    let drop_in = write_drop_in("90-test-template.toml", &factory_toml);
    let (out, err, code) = common::kata_runtime(&["factory", "destroy"]);
    let _ = std::fs::remove_file(&drop_in);
    assert_eq!((out.as_str(), code), ("vm factory destroyed\n", 0), "{err}");
    assert!(!Path::new(template).exists(), "the template is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_on_a_cached_vm_serves_tcp_and_execs_as_a_cold_one() {
    // VMCache: the pod's VM was booted by the server before the pod existed, outside the pod's
    // network namespace; it gets its NIC as a tap descriptor over QMP.
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let endpoint = "/run/vc/it-cri-vmcache.sock";
    let drop_in = write_drop_in(
        "90-test-vmcache.toml",
        &format!("[factory]\nvm_cache_number = 1\nvm_cache_endpoint = \"{endpoint}\"\n"),
    );
    let (out, _, _) = common::kata_runtime(&["factory", "destroy"]);
    assert_eq!(out, "vm factory destroyed\n");
    let log = std::env::temp_dir().join("it-cri-vmcache.log");
    let mut server = common::start_cache_server(None, &log);
    let ready = common::cached_vms(None, 1, &log);
    let started = web_pod(&mut c, "kata-vmcache", &[]).await;
    let _ = std::fs::remove_file(&drop_in);
    let (pod, ip) = started;
    let qemu = qemu_of(&pod);
    assert_eq!(ready, [qemu], "the pod's QEMU is the cached one");
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains("-name sandbox-vmcache-") && !argv.contains("virtio-net-pci"),
        "a cached VM, with no NIC on its command line: {argv}"
    );
    let netns = std::fs::read_link(format!("/proc/{qemu}/ns/net")).expect("QEMU's netns");
    let host = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    assert_eq!(netns, host, "the cached QEMU stays in the host namespace");
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let probe = start_probe(&mut c, &pod).await;
    assert_guest_clock_is_the_hosts(&mut c, &probe).await;
    download_into(&mut c, &probe).await;
    remove_pod(&mut c, &pod).await;
    assert_pod_gone(&pod);
    let drop_in = write_drop_in(
        "90-test-vmcache.toml",
        &format!("[factory]\nvm_cache_number = 1\nvm_cache_endpoint = \"{endpoint}\"\n"),
    );
    let (out, err, code) = common::kata_runtime(&["factory", "destroy"]);
    let _ = std::fs::remove_file(&drop_in);
    assert_eq!((out.as_str(), code), ("vm factory destroyed\n", 0), "{err}");
    let status = server.wait().expect("the server exits");
    assert!(status.success(), "{status}");
    assert_eq!(common::cached_vm_leftovers(), Vec::<String>::new());
}

/// The guest's clock (seen from container `probe`) is within 5 s of the host's: set for a VM
/// that did not boot for its pod (a clone, a cached VM).
async fn assert_guest_clock_is_the_hosts(c: &mut RuntimeServiceClient<Channel>, probe: &str) {
    let (date, code) = exec(c, probe, &["date", "+%s"]).await;
    assert_eq!(code, 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let guest: i64 = date.trim().parse().expect("date");
    assert!((guest - now).abs() <= 5, "guest clock {guest}, host {now}");
}
