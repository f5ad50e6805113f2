//! The security context, as runc applies it: user, group and supplemental groups, a read-only
//! root filesystem, capabilities, no_new_privs, masked and read-only paths, privileged, and
//! seccomp (`RuntimeDefault`, `Unconfined`, a `Localhost` profile).

use super::*;

/// `grep FIELD /proc/self/status`'s value.
const STATUS: &str =
    "for f in CapEff NoNewPrivs Seccomp; do grep \"^$f:\" /proc/self/status | tr -d '\\t '; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn the_security_context_as_with_runc() {
    let profile = std::env::temp_dir().join("kata-conformance-seccomp.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .expect("write the seccomp profile");
    let profile_path = profile.display().to_string();
    let seen = each_handler(|handler| {
        let profile_path = profile_path.clone();
        async move {
            let mut pod = Pod::run(handler, "cf-sec", privileged_pod).await;
            let user = pod
                .start("user", cri::IDLE, |c| {
                    let s = security(c);
                    s.run_as_user = Some(Int64Value { value: 1000 });
                    s.run_as_group = Some(Int64Value { value: 2000 });
                    s.supplemental_groups = vec![3000];
                })
                .await;
            let id = pod.sh(&user, "id").await;
            let locked = pod
                .start("locked", cri::IDLE, |c| {
                    let s = security(c);
                    s.readonly_rootfs = true;
                    s.no_new_privs = true;
                    s.capabilities = Some(Capability {
                        drop_capabilities: vec!["ALL".into()],
                        add_capabilities: vec!["NET_BIND_SERVICE".into()],
                        ..Default::default()
                    });
                    s.masked_paths = vec!["/proc/timer_list".into()];
                    s.readonly_paths = vec!["/proc/sys".into()];
                    s.seccomp = Some(SecurityProfile {
                        profile_type: security_profile::ProfileType::RuntimeDefault as i32,
                        ..Default::default()
                    });
                })
                .await;
            let locked_status = pod.sh(&locked, STATUS).await;
            let (_, rootfs_write) = pod.exec(&locked, &["touch", "/x"]).await;
            let masked = pod.sh(&locked, "wc -c < /proc/timer_list").await;
            let (_, sys_write) = pod
                .exec(&locked, &["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"])
                .await;
            let unconfined = pod
                .start("unconfined", cri::IDLE, |c| {
                    security(c).seccomp = Some(SecurityProfile {
                        profile_type: security_profile::ProfileType::Unconfined as i32,
                        ..Default::default()
                    });
                })
                .await;
            let unconfined_status = pod.sh(&unconfined, STATUS).await;
            let local = pod
                .start("local", cri::IDLE, |c| {
                    security(c).seccomp = Some(SecurityProfile {
                        profile_type: security_profile::ProfileType::Localhost as i32,
                        localhost_ref: profile_path,
                    });
                })
                .await;
            let (mkdir, mkdir_code) = pod.exec(&local, &["mkdir", "/tmp/d"]).await;
            let privileged = pod
                .start("privileged", cri::IDLE, |c| {
                    security(c).privileged = true;
                })
                .await;
            let privileged_status = pod.sh(&privileged, STATUS).await;
            pod.remove().await;
            (
                id,
                locked_status,
                rootfs_write != 0,
                masked,
                sys_write != 0,
                unconfined_status,
                (mkdir.contains("Operation not permitted"), mkdir_code),
                privileged_status,
            )
        }
    })
    .await;
    let _ = std::fs::remove_file(&profile);
    let runc = &seen["runc"];
    assert!(
        runc.0.contains("uid=1000") && runc.0.contains("gid=2000") && runc.0.contains("3000"),
        "the oracle's id: {}",
        runc.0
    );
    assert_eq!(
        runc.1, "CapEff:0000000000000400\nNoNewPrivs:1\nSeccomp:2",
        "the oracle"
    );
    assert!(
        runc.2 && runc.4,
        "the oracle's read-only root and /proc/sys"
    );
    assert_eq!(runc.3, "0", "the oracle's masked /proc/timer_list");
    assert!(
        runc.5.ends_with("Seccomp:0"),
        "the oracle unconfined: {}",
        runc.5
    );
    assert_eq!(runc.6, (true, 1), "the oracle's Localhost profile");
    assert_same("the security context", &seen);
}
