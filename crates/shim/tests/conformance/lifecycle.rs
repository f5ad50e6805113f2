//! A container's and a pod's lifecycle as a kubelet drives it: StopContainer's SIGTERM then
//! SIGKILL, restarts (attempts) in one pod, an init container before the main one, the pod's
//! shared PID namespace, DNS, hostname, sysctls, and idempotent stops and removes.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn stop_sends_sigterm_then_sigkill_after_the_timeout() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-stop", |_| {}).await;
        let polite = pod
            .start(
                "polite",
                &[
                    "sh",
                    "-c",
                    "trap 'exit 7' TERM; while :; do sleep 0.1; done",
                ],
                |_| {},
            )
            .await;
        // It ignores SIGTERM: only the SIGKILL after the timeout ends it.
        let stubborn = pod
            .start(
                "stubborn",
                &["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
                |_| {},
            )
            .await;
        let stop = |c: &mut RuntimeServiceClient<Channel>, id: String, timeout: i64| {
            let mut c = c.clone();
            async move {
                let t = Instant::now();
                c.stop_container(StopContainerRequest {
                    container_id: id,
                    timeout,
                })
                .await
                .expect("StopContainer");
                t.elapsed()
            }
        };
        let polite_took = stop(&mut pod.c, polite.clone(), 10).await;
        let stubborn_took = stop(&mut pod.c, stubborn.clone(), 2).await;
        let polite_code = pod.status(&polite).await.exit_code;
        let stubborn_code = pod.status(&stubborn).await.exit_code;
        // Stopping what is stopped, and removing twice, succeed (the kubelet retries); a pod
        // removed already is not found (containerd's answer, the same for every handler).
        let again = pod
            .c
            .stop_container(StopContainerRequest {
                container_id: stubborn.clone(),
                timeout: 2,
            })
            .await
            .is_ok();
        let mut removes = Vec::new();
        for _ in 0..2 {
            removes.push(
                pod.c
                    .remove_container(RemoveContainerRequest {
                        container_id: stubborn.clone(),
                    })
                    .await
                    .is_ok(),
            );
        }
        let (pod_id, mut c) = (pod.id.clone(), pod.c.clone());
        pod.remove().await;
        let stop_again = c
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_id.clone(),
            })
            .await
            .is_ok();
        let remove_again = c
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod_id,
            })
            .await
            .is_ok();
        (
            polite_code,
            polite_took < Duration::from_secs(5),
            stubborn_code,
            stubborn_took >= Duration::from_secs(2) && stubborn_took < Duration::from_secs(8),
            again,
            removes,
            stop_again,
            remove_again,
        )
    })
    .await;
    assert_eq!(
        seen["runc"],
        (7, true, 137, true, true, vec![true, true], false, true),
        "the oracle"
    );
    assert_same("StopContainer", &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn restarts_and_an_init_container_in_one_pod() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-restart", |_| {}).await;
        // An init container runs to completion before the main one starts.
        let init = pod
            .start("init", &["sh", "-c", "echo init; sleep 1; exit 0"], |_| {})
            .await;
        let init_done = pod.wait_exited(&init, Duration::from_secs(30)).await;
        // The kubelet restarts an exited container as a new one with the next attempt number.
        let mut attempts = Vec::new();
        for attempt in 0..4u32 {
            let id = pod
                .start("app", &["sh", "-c", "echo run; exit 3"], |c| {
                    if let Some(m) = c.metadata.as_mut() {
                        m.attempt = attempt;
                    }
                    c.log_path = format!("app-{attempt}.log");
                })
                .await;
            let s = pod.wait_exited(&id, Duration::from_secs(30)).await;
            attempts.push((s.metadata.map_or(99, |m| m.attempt), s.exit_code));
            pod.c
                .remove_container(RemoveContainerRequest { container_id: id })
                .await
                .expect("RemoveContainer");
        }
        let main = pod.start("main", cri::IDLE, |_| {}).await;
        let main_started = pod.status(&main).await.started_at;
        let left = pod
            .c
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: pod.id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListContainers")
            .into_inner()
            .containers
            .len();
        pod.remove().await;
        (
            init_done.exit_code,
            init_done.finished_at < main_started,
            attempts,
            left,
        )
    })
    .await;
    assert_eq!(
        seen["runc"],
        (0, true, vec![(0, 3), (1, 3), (2, 3), (3, 3)], 2),
        "the oracle: init and main are left, the app's attempts are gone"
    );
    assert_same("restarts", &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn shared_pid_namespace_dns_hostname_and_sysctls() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-pod", |p| {
            p.dns_config = Some(DnsConfig {
                servers: vec!["192.0.2.53".into()],
                searches: vec!["example.test".into()],
                options: vec!["ndots:2".into()],
            });
            let linux = p.linux.get_or_insert_with(Default::default);
            linux.sysctls = [(
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "80".to_string(),
            )]
            .into_iter()
            .collect();
            linux.security_context = Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
        })
        .await;
        let pod_ns = |c: &mut ContainerConfig| {
            security(c).namespace_options = Some(NamespaceOption {
                pid: NamespaceMode::Pod as i32,
                ..Default::default()
            });
        };
        let a = pod.start("a", &["sleep", "4242"], pod_ns).await;
        let b = pod.start("b", cri::IDLE, pod_ns).await;
        let sees_a = pod.sh(&b, "ps -o args | grep -c '^sleep 4242'").await;
        let resolv = pod.sh(&a, "cat /etc/resolv.conf").await;
        let hostname = pod.sh(&b, "hostname").await;
        let sysctl = pod
            .sh(&b, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start")
            .await;
        // Without the pod's PID namespace, a container sees only its own processes.
        let own = pod
            .start("own", cri::IDLE, |c| {
                security(c).namespace_options = Some(NamespaceOption {
                    pid: NamespaceMode::Container as i32,
                    ..Default::default()
                });
            })
            .await;
        let own_sees = pod
            .sh(&own, "ps -o args | grep -c '^sleep 4242' || true")
            .await;
        pod.remove().await;
        (
            sees_a,
            resolv,
            hostname == format!("cf-pod-{handler}"),
            sysctl,
            own_sees,
        )
    })
    .await;
    let (sees_a, resolv, hostname, sysctl, own_sees) = &seen["runc"];
    assert_eq!(
        (
            sees_a.as_str(),
            *hostname,
            sysctl.as_str(),
            own_sees.as_str()
        ),
        ("1", true, "80", "0"),
        "the oracle"
    );
    assert!(
        resolv.contains("nameserver 192.0.2.53")
            && resolv.contains("search example.test")
            && resolv.contains("options ndots:2"),
        "{resolv}"
    );
    assert_same("the pod's namespaces, DNS, hostname and sysctls", &seen);
}
