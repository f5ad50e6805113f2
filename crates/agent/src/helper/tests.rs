//! Unit tests of [`super`].

use super::*;

#[test]
fn sysctls_of_the_containers_namespaces_only() {
    assert_eq!(
        sysctl_path("net.ipv4.ip_forward").expect("net"),
        PathBuf::from("/proc/sys/net/ipv4/ip_forward")
    );
    assert_eq!(
        sysctl_path("kernel.shm_rmid_forced").expect("ipc"),
        PathBuf::from("/proc/sys/kernel/shm_rmid_forced")
    );
    sysctl_path("fs.mqueue.msg_max").expect("mqueue");
    for refused in ["kernel.panic", "vm.overcommit_memory", "fs.file-max"] {
        let e = sysctl_path(refused).expect_err(refused);
        assert!(
            e.to_string().contains("not in a separate kernel namespace"),
            "{e}"
        );
    }
    for bad in ["", "net..x", "net./../x", "net.ipv4/../../x", "net.."] {
        assert!(sysctl_path(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_own_cgroup_is_read_from_the_unified_line() {
    use super::rootfs::own_cgroup_of;
    assert_eq!(
        own_cgroup_of("0::/kata/c1\n"),
        Some(std::path::PathBuf::from("kata/c1"))
    );
    assert_eq!(own_cgroup_of("0::/\n"), None);
    assert_eq!(own_cgroup_of("0::/kata/../x\n"), None);
    assert_eq!(own_cgroup_of("1:name=systemd:/x\n"), None);
}
