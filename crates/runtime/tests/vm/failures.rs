//! Failures reach the user with their reason and leave nothing: missing assets, a panicking guest,
//! a silent agent.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and QEMU (make test runs it)"]
async fn missing_assets_are_named_and_nothing_is_left() {
    for (key, value, expect) in [
        ("kernel", "/opt/kata/share/kata-containers/no-such-vmlinux", "guest kernel /opt/kata/share/kata-containers/no-such-vmlinux does not exist ([hypervisor.qemu].kernel)"),
        ("initrd", "/opt/kata/share/kata-containers/no-such-initrd", "guest initrd /opt/kata/share/kata-containers/no-such-initrd does not exist ([hypervisor.qemu].initrd)"),
        ("image", "/opt/kata/share/kata-containers/no-such-image", "guest rootfs image /opt/kata/share/kata-containers/no-such-image does not exist ([hypervisor.qemu].image)"),
    ] {
        let mut c = config(&[]);
        match key {
            "kernel" => c.hypervisor.kernel = value.into(),
            "initrd" => {
                c.hypervisor.image = String::new();
                c.hypervisor.initrd = value.into();
            }
            _ => {
                c.hypervisor.initrd = String::new();
                c.hypervisor.image = value.into();
            }
        }
        let id = format!("it-missing-{key}");
        kata_sandbox::sandbox::cleanup_stale(&id);
        let e = Sandbox::create(&id, &c).await.expect_err("must fail");
        let msg = kata_config::error_chain(&e);
        assert!(msg.contains(expect), "{msg}");
        assert_no_leftovers(&id);
    }
    let mut c = config(&[]);
    c.hypervisor.path = "/usr/bin/no-such-qemu".into();
    let e = Sandbox::create("it-missing-qemu", &c)
        .await
        .expect_err("no qemu");
    assert!(
        kata_config::error_chain(&e).contains("/usr/bin/no-such-qemu"),
        "{}",
        kata_config::error_chain(&e)
    );
    assert_no_leftovers("it-missing-qemu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn a_panicking_guest_is_reported_with_its_console() {
    let mut c = config(&[]);
    // rdinit= for an initrd, init= for the rootfs image (the default).
    c.hypervisor.kernel_params = "rdinit=/no-such-init init=/no-such-init".into();
    c.agent.dial_timeout = 60;
    kata_sandbox::sandbox::cleanup_stale("it-panic");
    let t = Instant::now();
    let e = Sandbox::create("it-panic", &c).await.expect_err("panics");
    let msg = kata_config::error_chain(&e);
    assert!(matches!(e, SandboxError::Vm(_)), "{msg}");
    assert!(msg.contains("Kernel panic"), "{msg}");
    assert!(
        t.elapsed().as_secs() < 60,
        "reported within the dial timeout"
    );
    assert_no_leftovers("it-panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and the installed guest (make test runs it)"]
async fn an_agent_that_never_answers_times_out_with_the_console() {
    let mut c = config(&[]);
    // busybox sh as init: the guest runs, but nothing serves the agent API.
    c.hypervisor.kernel_params = "rdinit=/bin/sh init=/bin/sh".into();
    c.agent.dial_timeout = 6;
    kata_sandbox::sandbox::cleanup_stale("it-silent");
    let t = Instant::now();
    let e = Sandbox::create("it-silent", &c)
        .await
        .expect_err("no agent");
    let secs = t.elapsed().as_secs_f64();
    let msg = kata_config::error_chain(&e);
    assert!(
        matches!(e, SandboxError::AgentTimeout { timeout: 6, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("[agent.kata].dial_timeout") && msg.contains("guest console:"),
        "{msg}"
    );
    assert!((6.0..30.0).contains(&secs), "gave up after {secs:.1} s");
    assert_no_leftovers("it-silent");
}
