use super::*;

fn node(host_root: &Path) -> Node {
    Node {
        host_root: host_root.to_path_buf(),
        prefix: PathBuf::from("/opt/kata"),
        manager: Manager::Containerd,
        containerd_config: PathBuf::from("/etc/containerd/config.toml"),
        crio_config_dir: PathBuf::from("/etc/crio/crio.conf.d"),
        socket: PathBuf::from(Manager::Containerd.default_socket()),
        restart: "true".into(),
        restart_timeout: Duration::from_secs(1),
        shim_dir: PathBuf::from("/usr/local/bin"),
        node_name: None,
        kube_api: None,
    }
}

#[test]
fn the_manager_is_found_by_its_configuration() {
    let host = tempfile::tempdir().expect("tempdir");
    let h = host.path();
    let detect = || {
        Manager::detect(
            h,
            Path::new("/etc/containerd/config.toml"),
            Path::new("/etc/crio/crio.conf.d"),
        )
    };
    // Nothing: an error that names what was looked for and the flag.
    let e = detect().expect_err("no manager").to_string();
    assert!(
        e.contains("/etc/containerd/config.toml") && e.contains("--manager"),
        "{e}"
    );
    // An empty crio.conf.d (the DaemonSet's hostPath creates it) or only our own drop-in
    // is not CRI-O.
    std::fs::create_dir_all(h.join("etc/crio/crio.conf.d")).expect("mkdir");
    std::fs::write(h.join("etc/crio/crio.conf.d").join(crio::DROP_IN), "").expect("write");
    assert!(detect().is_err());
    std::fs::write(h.join("etc/crio/crio.conf.d/00-default"), "").expect("write");
    assert_eq!(detect().expect("crio"), Manager::Crio);
    // containerd's configuration wins.
    std::fs::create_dir_all(h.join("etc/containerd")).expect("mkdir");
    std::fs::write(h.join("etc/containerd/config.toml"), "version = 2\n").expect("write");
    assert_eq!(detect().expect("containerd"), Manager::Containerd);
    assert_eq!(
        Manager::Crio.default_restart(Path::new("/host")),
        "chroot /host systemctl restart crio"
    );
    assert_eq!(
        Manager::Containerd.default_restart(Path::new("/")),
        "systemctl restart containerd"
    );
}

#[test]
fn an_imported_cri_section_is_named_not_silently_overridden() {
    let host = tempfile::tempdir().expect("tempdir");
    let n = node(host.path());
    let etc = host.path().join("etc/containerd");
    std::fs::create_dir_all(etc.join("conf.d")).expect("mkdir");
    let config = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
    std::fs::write(etc.join("config.toml"), config).expect("write");
    // Another file in conf.d, without the CRI plugin: the edit goes ahead.
    std::fs::write(
        etc.join("conf.d/metrics.toml"),
        "[metrics]\naddress = \"\"\n",
    )
    .expect("write");
    assert_eq!(cri_section_imported(&n, config), None);
    // One that sets it would replace the edited section in containerd 1.x.
    std::fs::write(
        etc.join("conf.d/cri.toml"),
        "[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause\"\n",
    )
    .expect("write");
    assert_eq!(
        cri_section_imported(&n, config),
        Some(PathBuf::from("/etc/containerd/conf.d/cri.toml"))
    );
    let e = configure(&n).expect_err("refused").to_string();
    assert!(
        e.contains("conf.d/cri.toml") && e.contains("--containerd-config"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("config.toml")).expect("read"),
        config,
        "the configuration changed"
    );
}

#[test]
fn shims_are_linked_and_what_they_replaced_comes_back() {
    let host = tempfile::tempdir().expect("tempdir");
    let n = node(host.path());
    let bin = host.path().join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    // A shim of the node's own (an install from source, say) under the first name.
    let own = bin.join("containerd-shim-kata-v2");
    std::fs::write(&own, b"#!/bin/sh\necho own\n").expect("write");
    link_shims(&n).expect("link");
    for h in &HANDLERS {
        assert_eq!(
            std::fs::read_link(bin.join(h.shim)).expect("link"),
            PathBuf::from(h.shim_path(&n.prefix))
        );
    }
    // Linking again keeps the first record of the node's own file.
    link_shims(&n).expect("link again");
    unlink_shims(&n).expect("unlink");
    assert_eq!(
        std::fs::read(&own).expect("own shim back"),
        b"#!/bin/sh\necho own\n"
    );
    assert!(std::fs::symlink_metadata(bin.join("containerd-shim-kata-qemu-v2")).is_err());
    // Nothing left to do: fine.
    unlink_shims(&n).expect("unlink again");
}
