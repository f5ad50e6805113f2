//! The pod's network: the interfaces the CNI plugins put in the pod's network namespace are
//! mirrored into the VM. Per interface the runtime creates, in that namespace:
//!
//! - `tcfilter`: a tap, joined to the interface by tc mirred redirect both ways;
//! - `macvtap`: a macvtap in passthru mode on the interface (it takes all of the interface's
//!   traffic, with its MAC), whose character device QEMU gets as an open file descriptor;
//! - `none`: a tap, not joined.
//!
//! QEMU, started inside the namespace, gives the guest a virtio-net NIC on it with the
//! interface's MAC. The agent then sets the addresses, MTU and routes in the guest.
//!
//! Links, addresses, routes and qdiscs are read and changed with iproute2's `ip` and `tc`,
//! entered into the namespace with `nsenter` (both are runtime requirements, as CNI plugins are).

use std::path::{Path, PathBuf};
use std::process::Command;

use kata_config::runtime::InterNetworkingModel;
use serde::Deserialize;

use crate::error::SandboxError;

/// One pod interface mirrored into the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Name in the pod namespace (and, after the agent renames it, in the guest).
    pub name: String,
    /// MAC address (the VM's NIC gets the same).
    pub mac: String,
    /// MTU.
    pub mtu: u64,
    /// IPv4 and (global) IPv6 addresses with prefix lengths.
    pub addresses: Vec<(String, u32)>,
    /// The tap (or macvtap) QEMU uses.
    pub tap: String,
    /// The macvtap's character device (major, minor), for QEMU to open by descriptor.
    pub macvtap_dev: Option<(u32, u32)>,
}

/// A route of the pod namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// "default" or a CIDR.
    pub dest: String,
    /// Gateway, empty for a connected route.
    pub gateway: String,
    /// Device.
    pub device: String,
}

/// The network of a sandbox: what was set up, to be torn down.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// Interfaces.
    pub endpoints: Vec<Endpoint>,
    /// Routes to replay in the guest.
    pub routes: Vec<Route>,
}

#[derive(Debug, Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u64,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Debug, Deserialize)]
struct IpAddrInfo {
    family: String,
    local: String,
    prefixlen: u32,
    #[serde(default)]
    scope: String,
}

#[derive(Debug, Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    gateway: String,
    #[serde(default)]
    dev: String,
}

/// Suffix of the taps this runtime creates.
pub const TAP_SUFFIX: &str = "_kata";

fn run_in(netns: &Path, prog: &str, args: &[&str]) -> Result<String, SandboxError> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(prog)
        .args(args)
        .output()
        .map_err(|e| {
            SandboxError::Network(format!(
                "cannot run nsenter {prog} (install util-linux and iproute2): {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(SandboxError::Network(format!(
            "`{prog} {}` in network namespace {} failed: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Interfaces and routes of `netns` worth mirroring (Ethernet links other than our taps).
fn scan(netns: &Path) -> Result<(Vec<Endpoint>, Vec<Route>), SandboxError> {
    let links: Vec<IpLink> =
        serde_json::from_str(&run_in(netns, "ip", &["-j", "addr", "show"])?)
            .map_err(|e| SandboxError::Network(format!("unexpected `ip -j addr` output: {e}")))?;
    let mut endpoints = Vec::new();
    for l in links {
        if l.link_type != "ether" || l.ifname.ends_with(TAP_SUFFIX) {
            continue;
        }
        // Link-local IPv6 addresses derive from the MAC: the guest makes the same ones.
        let addresses = l
            .addr_info
            .iter()
            .filter(|a| a.family == "inet" || (a.family == "inet6" && a.scope == "global"))
            .map(|a| (a.local.clone(), a.prefixlen))
            .collect();
        let tap = format!("tap{}{TAP_SUFFIX}", endpoints.len());
        endpoints.push(Endpoint {
            name: l.ifname,
            mac: l.address,
            mtu: l.mtu,
            addresses,
            tap,
            macvtap_dev: None,
        });
    }
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let found: Vec<IpRoute> =
            serde_json::from_str(&run_in(netns, "ip", &["-j", family, "route", "show"])?).map_err(
                |e| SandboxError::Network(format!("unexpected `ip -j route` output: {e}")),
            )?;
        routes.extend(
            found
                .into_iter()
                // The kernel makes the connected (and link-local) routes itself when the agent
                // sets the addresses.
                .filter(|r| {
                    r.protocol != "kernel"
                        && !r.dst.starts_with("fe80:")
                        && endpoints.iter().any(|e| e.name == r.dev)
                })
                .map(|r| Route {
                    // "default" names no family; the agent tells them apart by ':'.
                    dest: if family == "-6" && r.dst == "default" {
                        "::/0".into()
                    } else {
                        r.dst
                    },
                    gateway: r.gateway,
                    device: r.dev,
                }),
        );
    }
    Ok((endpoints, routes))
}

/// Token bucket sizing for a rate in bit/s: 100 ms worth, at least 16 KiB.
fn tbf_args(rate: u64) -> Vec<String> {
    let burst = (rate / 8 / 10).max(16 * 1024);
    vec![
        "root".into(),
        "tbf".into(),
        "rate".into(),
        format!("{rate}bit"),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "100ms".into(),
    ]
}

fn tc(netns: &Path, args: &[String]) -> Result<(), SandboxError> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_in(netns, "tc", &refs).map(|_| ())
}

fn redirect(netns: &Path, from: &str, to: &str) -> Result<(), SandboxError> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    tc(
        netns,
        &s(&["qdisc", "add", "dev", from, "handle", "ffff:", "ingress"]),
    )?;
    tc(
        netns,
        &s(&[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ]),
    )
}

/// The ifb device that shapes what arrives on endpoint `i`'s interface (macvtap rx limit).
fn ifb_name(i: usize) -> String {
    format!("ifb{i}{TAP_SUFFIX}")
}

/// The (major, minor) of macvtap `name`'s character device. Its sysfs entry is visible only in
/// a sysfs mounted from inside the namespace: one is mounted in a private mount namespace.
fn macvtap_device(netns: &Path, name: &str) -> Result<(u32, u32), SandboxError> {
    #[derive(Deserialize)]
    struct Link {
        ifindex: u32,
    }
    let links: Vec<Link> =
        serde_json::from_str(&run_in(netns, "ip", &["-j", "link", "show", "dev", name])?)
            .map_err(|e| SandboxError::Network(format!("unexpected `ip -j link` output: {e}")))?;
    let index = links
        .first()
        .map(|l| l.ifindex)
        .ok_or_else(|| SandboxError::Network(format!("macvtap {name} vanished")))?;
    let script =
        format!("mount -t sysfs sysfs /sys && cat /sys/class/net/{name}/macvtap/tap{index}/dev");
    let out = run_in(
        netns,
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-c", &script],
    )?;
    parse_dev(&out).ok_or_else(|| {
        SandboxError::Network(format!(
            "macvtap {name}: unexpected device number {:?}",
            out.trim()
        ))
    })
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

impl PodNetwork {
    /// Sets up the taps of `netns` for `model`; `rx`/`tx` are rate limits in bit/s (0: none)
    /// for traffic into and out of the VM. On error, undoes what it did.
    pub fn prepare(
        netns: &Path,
        model: InterNetworkingModel,
        rx: u64,
        tx: u64,
    ) -> Result<PodNetwork, SandboxError> {
        if !netns.exists() {
            return Err(SandboxError::Network(format!(
                "the pod's network namespace {} does not exist; was it removed before the sandbox started?",
                netns.display()
            )));
        }
        let (endpoints, routes) = scan(netns)?;
        let mut net = PodNetwork {
            netns: netns.to_path_buf(),
            endpoints,
            routes,
        };
        if let Err(e) = net.connect(model, rx, tx) {
            net.teardown();
            return Err(e);
        }
        Ok(net)
    }

    fn connect(
        &mut self,
        model: InterNetworkingModel,
        rx: u64,
        tx: u64,
    ) -> Result<(), SandboxError> {
        let netns = self.netns.clone();
        for (i, e) in self.endpoints.iter_mut().enumerate() {
            if model == InterNetworkingModel::Macvtap {
                run_in(
                    &netns,
                    "ip",
                    &[
                        "link", "add", "link", &e.name, "name", &e.tap, "type", "macvtap", "mode",
                        "passthru",
                    ],
                )
                .map_err(|err| {
                    SandboxError::Network(format!(
                        "{err} (internetworking_model = \"macvtap\" needs the host kernel's macvtap driver: modprobe macvtap)"
                    ))
                })?;
            } else {
                run_in(
                    &netns,
                    "ip",
                    &["tuntap", "add", "dev", &e.tap, "mode", "tap"],
                )?;
            }
            let mtu = e.mtu.to_string();
            run_in(
                &netns,
                "ip",
                &["link", "set", "dev", &e.tap, "mtu", &mtu, "up"],
            )?;
            let dev = |d: &str, rate: u64| -> Result<(), SandboxError> {
                if rate == 0 {
                    return Ok(());
                }
                let mut args = vec![
                    "qdisc".to_string(),
                    "add".into(),
                    "dev".into(),
                    d.to_string(),
                ];
                args.extend(tbf_args(rate));
                tc(&self.netns, &args)
            };
            match model {
                InterNetworkingModel::TcFilter => {
                    redirect(&netns, &e.name, &e.tap)?;
                    redirect(&netns, &e.tap, &e.name)?;
                    // Into the VM: the tap's egress. Out of the VM: redirected to the
                    // interface's egress.
                    dev(&e.tap, rx)?;
                    dev(&e.name, tx)?;
                }
                InterNetworkingModel::Macvtap => {
                    e.macvtap_dev = Some(macvtap_device(&netns, &e.tap)?);
                    // Out of the VM: the macvtap sends through the interface's egress. Into
                    // the VM: frames reach the macvtap from the interface's receive path; they
                    // are shaped by an ifb device the interface's ingress redirects to, which
                    // hands them back to the interface's receive path.
                    dev(&e.name, tx)?;
                    if rx > 0 {
                        let ifb = ifb_name(i);
                        run_in(&netns, "ip", &["link", "add", &ifb, "type", "ifb"]).map_err(
                            |err| SandboxError::Network(format!(
                                "{err} (rx_rate_limiter_max_rate with macvtap needs the host kernel's ifb driver: modprobe ifb)"
                            )),
                        )?;
                        run_in(&netns, "ip", &["link", "set", "dev", &ifb, "up"])?;
                        dev(&ifb, rx)?;
                        redirect(&netns, &e.name, &ifb)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the taps and qdiscs (idempotent; a namespace already gone is fine).
    pub fn teardown(&self) {
        if !self.netns.exists() {
            return;
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let _ = run_in(&self.netns, "ip", &["link", "del", "dev", &e.tap]);
            let _ = run_in(&self.netns, "ip", &["link", "del", "dev", &ifb_name(i)]);
            let _ = run_in(
                &self.netns,
                "tc",
                &["qdisc", "del", "dev", &e.name, "ingress"],
            );
            let _ = run_in(&self.netns, "tc", &["qdisc", "del", "dev", &e.name, "root"]);
        }
    }
}

/// Where the namespaces this runtime makes live (`ip netns` lists them).
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of the network namespaces this runtime makes for sandboxes.
pub const OWNED_NETNS_PREFIX: &str = "kata-net-";

/// The network namespace this runtime makes for sandbox `id` when its manager asks for a
/// namespace of its own without naming one (Docker): `/run/netns/kata-net-<id>`.
pub fn owned_netns_path(id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("{OWNED_NETNS_PREFIX}{id}"))
}

/// Makes sandbox `id`'s own network namespace (with `ip netns add`, which pins it in
/// [`NETNS_DIR`]); returns its path. Only QEMU runs in it: the containers' own loopback is
/// the guest's.
pub fn create_owned_netns(id: &str) -> Result<PathBuf, SandboxError> {
    crate::ids::check("sandbox", id)?;
    let name = format!("{OWNED_NETNS_PREFIX}{id}");
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .map_err(|e| SandboxError::Network(format!("cannot run ip (install iproute2): {e}")))?;
    if !out.status.success() {
        return Err(SandboxError::Network(format!(
            "cannot make the sandbox's network namespace ({}): `ip netns add {name}`: {}",
            owned_netns_path(id).display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(owned_netns_path(id))
}

/// Removes sandbox `id`'s own network namespace, if there is one (the interfaces a manager
/// moved there go with it once nothing else holds it).
pub fn delete_owned_netns(id: &str) {
    if !crate::ids::is_valid(id) || !owned_netns_path(id).exists() {
        return;
    }
    let name = format!("{OWNED_NETNS_PREFIX}{id}");
    match Command::new("ip").args(["netns", "delete", &name]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            netns = %name,
            error = %String::from_utf8_lossy(&o.stderr).trim(),
            "cannot delete the sandbox's network namespace"
        ),
        Err(e) => tracing::warn!(netns = %name, error = %e, "cannot run ip netns delete"),
    }
}

/// Whether a spec asks for a network namespace of its own without naming one: the runtime
/// makes it, and the manager configures it after Create through the task's pid (Docker).
pub fn wants_new_netns(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
            })
        })
}

/// The network namespace a spec's sandbox container joins (a path), if any.
pub fn netns_of(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// Opens tap `name` of network namespace `netns` as QEMU would (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`), for a QEMU that runs outside the namespace (a VM taken from the VMCache):
/// the descriptor is handed to it over QMP.
pub fn open_tap(netns: &Path, name: &str) -> Result<std::os::fd::OwnedFd, SandboxError> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let fail = |what: &str, e: std::io::Error| {
        SandboxError::Network(format!(
            "cannot open tap {name} in {}: {what}: {e}",
            netns.display()
        ))
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(fail(
            "name",
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    let ns = std::fs::File::open(netns).map_err(|e| fail("open the namespace", e))?;
    let name_owned = name.to_string();
    // setns(2) changes the calling thread only: a thread of its own enters the namespace.
    let opened = std::thread::spawn(
        move || -> Result<std::os::fd::OwnedFd, (String, std::io::Error)> {
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a namespace descriptor this thread holds open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(("setns".into(), std::io::Error::last_os_error()));
            }
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(|e| ("open /dev/net/tun".to_string(), e))?;
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
                pad: [0; 22],
            };
            req.name[..name_owned.len()].copy_from_slice(name_owned.as_bytes());
            // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out.
            if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } != 0 {
                return Err(("TUNSETIFF".into(), std::io::Error::last_os_error()));
            }
            Ok(std::os::fd::OwnedFd::from(tun))
        },
    )
    .join()
    .map_err(|_| fail("thread", std::io::Error::other("panicked")))?;
    opened.map_err(|(what, e)| fail(&what, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket() {
        assert_eq!(tbf_args(4_000_000)[3], "4000000bit");
        assert_eq!(tbf_args(4_000_000)[5], "50000");
        assert_eq!(tbf_args(1000)[5], "16384");
    }

    #[test]
    fn device_numbers() {
        assert_eq!(parse_dev("246:1\n"), Some((246, 1)));
        assert_eq!(parse_dev("246"), None);
        assert_eq!(parse_dev("a:b"), None);
    }

    #[test]
    fn missing_netns_is_named() {
        let e = PodNetwork::prepare(
            Path::new("/var/run/netns/kata-test-nope"),
            InterNetworkingModel::TcFilter,
            0,
            0,
        )
        .expect_err("missing");
        assert!(
            e.to_string()
                .contains("/var/run/netns/kata-test-nope does not exist"),
            "{e}"
        );
    }

    #[test]
    fn parses_iproute2_json() {
        let links: Vec<IpLink> = serde_json::from_str(r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,"addr_info":[]},
            {"ifindex":3,"ifname":"eth0","link_type":"ether","address":"aa:bb:cc:dd:ee:ff","mtu":1500,"addr_info":[{"family":"inet","local":"198.51.100.7","prefixlen":24},{"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#).expect("links");
        assert_eq!(links[1].addr_info[0].local, "198.51.100.7");
        let routes: Vec<IpRoute> = serde_json::from_str(r#"[{"dst":"default","gateway":"198.51.100.1","dev":"eth0"},{"dst":"198.51.100.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"198.51.100.7"}]"#).expect("routes");
        assert_eq!(
            (routes[0].dst.as_str(), routes[0].gateway.as_str()),
            ("default", "198.51.100.1")
        );
        assert!(routes[1].gateway.is_empty());
    }
}
