//! The network a container manager configures after Create (Docker), and the guest's side of
//! the pod network (interfaces, addresses, routes).

use super::*;

impl Sandbox {
    /// Mirrors into the VM the interfaces a container manager put into the sandbox's own
    /// network namespace after Create (Docker moves the container's veth into
    /// `/proc/<task pid>/ns/net`, QEMU's namespace, and sets its addresses and routes before
    /// Start): taps as `[runtime].internetworking_model` says, a NIC hot-plugged per interface,
    /// and the guest's addresses and routes. Returns how many interfaces were attached. Does
    /// nothing for a sandbox whose namespace was named at Create (a CRI pod's), once the
    /// network is attached, or while the namespace holds no interface (`--network none`). On
    /// error the taps are removed again.
    pub async fn attach_late_network(&self) -> Result<usize, SandboxError> {
        let Some(ns) = self.owned_netns.clone() else {
            return Ok(0);
        };
        let attached = self
            .network
            .lock()
            .map(|n| n.as_ref().is_some_and(|n| !n.endpoints.is_empty()))
            .unwrap_or(true);
        if attached {
            return Ok(0);
        }
        let h = &self.config.hypervisor;
        let (model, rx, tx) = (
            self.config.runtime.internetworking_model,
            h.rx_rate_limiter_max_rate,
            h.tx_rate_limiter_max_rate,
        );
        let n = tokio::task::spawn_blocking(move || PodNetwork::prepare(&ns, model, rx, tx))
            .await
            .map_err(|e| SandboxError::Network(format!("setup task failed: {e}")))??;
        let count = n.endpoints.len();
        let plugged = async {
            let vhost = !h.disable_vhost_net && Path::new("/dev/vhost-net").exists();
            for (i, e) in n.endpoints.iter().enumerate() {
                let nic = Nic {
                    tap: e.tap.clone(),
                    mac: e.mac.clone(),
                    vhost,
                    fd: None,
                };
                match e.macvtap_dev {
                    Some(dev) => {
                        let f = open_char_device(&self.paths.vm_dir.join(&e.tap), dev)?;
                        use std::os::fd::AsFd;
                        self.vm.add_nic_fd(i, &nic, f.as_fd()).await?;
                    }
                    None => self.vm.add_nic(i, &nic).await?,
                }
            }
            if count > 0 {
                configure_guest_network(&self.agent, &n).await?;
            }
            Ok::<(), SandboxError>(())
        }
        .instrument(tracing::info_span!("late_network", interfaces = count))
        .await;
        if let Err(e) = plugged {
            let _ = tokio::task::spawn_blocking(move || n.teardown()).await;
            return Err(e);
        }
        if count > 0 {
            tracing::info!(
                interfaces = count,
                netns = %n.netns.display(),
                "network the manager configured after Create attached to the VM"
            );
        }
        if let Ok(mut slot) = self.network.lock() {
            *slot = Some(n);
        }
        Ok(count)
    }
}

/// Gives the guest the pod's interfaces (by MAC), addresses and routes.
pub(super) async fn configure_guest_network(
    agent: &AgentClient,
    n: &PodNetwork,
) -> Result<(), SandboxError> {
    for e in &n.endpoints {
        let req = UpdateInterfaceRequest {
            interface: protobuf::MessageField::some(Interface {
                name: e.name.clone(),
                hw_addr: e.mac.clone(),
                mtu: e.mtu,
                addresses: e
                    .addresses
                    .iter()
                    .map(|(a, p)| IPAddress {
                        address: a.clone(),
                        prefix: *p,
                        ipv6: a.contains(':'),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        agent
            .agent
            .update_interface(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("UpdateInterface"))?;
    }
    // Connected routes first (the kernel made them with the addresses), then via gateways.
    let mut routes: Vec<&crate::network::Route> = n.routes.iter().collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    let req = UpdateRoutesRequest {
        routes: routes
            .into_iter()
            .map(|r| Route {
                dest: r.dest.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    agent
        .agent
        .update_routes(ctx(CALL_TIMEOUT), &req)
        .await
        .map_err(agent_err("UpdateRoutes"))?;
    Ok(())
}

/// Makes a character device node `path` for (major, minor) and opens it read-write.
pub(super) fn open_char_device(
    path: &Path,
    (major, minor): (u32, u32),
) -> Result<std::fs::File, SandboxError> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let _ = std::fs::remove_file(path);
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(u64::from(major), u64::from(minor)),
    )
    .map_err(|e| {
        SandboxError::Network(format!("mknod {} ({major}:{minor}): {e}", path.display()))
    })?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("failed to open macvtap device", path))
}
