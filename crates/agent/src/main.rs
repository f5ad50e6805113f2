//! kata-agent: PID 1 of the guest.
//!
//! - [`init`]: early mounts, kernel modules, power-off;
//! - [`reaper`]: reaping children and delivering exits;
//! - [`channel`]: virtio-serial or vsock transport for ttrpc;
//! - [`rpc`]: the agent API;
//! - [`container`], [`helper`], [`mounts`]: running OCI containers;
//! - [`stream`]: stdout/stderr buffers; [`metrics`]: guest metrics;
//! - [`console`]: the debug console (`kata-runtime exec`);
//! - [`iptables`]: the guest's packet filter; [`guest_hooks`]: OCI hooks from the guest image;
//!   [`tools`]: the short-lived programs they run; [`volumes`]: hot-plugged block volumes;
//! - [`podns`]: the pod's namespaces when there is no pause container;
//! - in the library: [`seccomp`] (the container's filter) and [`devcg`] (its device cgroup).

mod channel;
mod console;
mod container;
mod error;
mod guest_hooks;
mod helper;
mod init;
mod iptables;
mod metrics;
mod mounts;
mod network;
mod oom;
mod podns;
mod portforward;
mod random;
mod reaper;
mod reclaim;
mod rpc;
use kata_agent::{devcg, seccomp};
mod spare;
mod stream;
mod tools;
mod volumes;
mod watched;

use std::sync::Arc;

fn uptime_us() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1e6) as u64)
        .unwrap_or(0)
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("init-container") => helper::main(),
        Some(podns::ARG) => podns::main(),
        _ => {}
    }
    let pid1 = std::process::id() == 1;
    if pid1 && init::root_is_initramfs() {
        if let Err(e) = init::leave_initramfs() {
            init::log(&format!(
                "cannot leave the initramfs (containers will fail to pivot_root): {e}"
            ));
        }
    }
    if pid1 {
        init::early_mounts();
        init::init_debug();
        let n = init::load_modules();
        init::log(&format!("loaded {n} kernel modules"));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            init::log(&format!("cannot start the async runtime: {e}"));
            if pid1 {
                init::power_off();
            }
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(serve());
    if let Err(e) = result {
        init::log(&format!("fatal: {e}"));
    }
    if pid1 {
        init::power_off();
    }
    std::process::exit(1);
}

async fn serve() -> std::io::Result<()> {
    let reaper = reaper::Reaper::start()?;
    console::start(reaper.clone(), tokio::runtime::Handle::current());
    let agent = Arc::new(rpc::Agent::new(reaper, uptime_us()));
    let (listener, desc) = channel::listener()?;
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(listener)
        .register_service(kata_protocols::agent_ttrpc::create_agent_service(
            agent.clone(),
        ))
        .register_service(kata_protocols::agent_ttrpc::create_health(agent));
    server
        .start()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    init::log(&format!(
        "serving the agent API on {desc} at {} us of uptime",
        uptime_us()
    ));
    // Off the path of the first create: the containers' cgroup and a helper started ahead.
    std::thread::spawn(|| {
        spare::refill();
        if let Err(e) = container::prepare_cgroup_root() {
            init::log(&format!("containers' cgroup: {e}"));
        }
    });
    // The server runs on its own tasks; PID 1 never exits on its own.
    std::future::pending::<()>().await;
    Ok(())
}
