//! Guest networking: configures the VM's NICs as the runtime describes the pod's interfaces
//! (found by MAC address), their IPv4 and IPv6 addresses, routes and ARP neighbours. Uses the
//! classic interface ioctls (AF_INET and AF_INET6 sockets), which the guest kernel always has.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::container::AgentError;

fn failed(what: String) -> impl Fn(std::io::Error) -> AgentError {
    move |e| AgentError::Failed(format!("{what}: {e}"))
}

/// How long UpdateInterface waits for a NIC with the requested MAC to appear.
const NIC_APPEAR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The guest interface whose MAC address is `mac` (case-insensitive).
pub fn find_by_mac(mac: &str) -> Result<String, AgentError> {
    let want = mac.to_ascii_lowercase();
    for e in std::fs::read_dir("/sys/class/net")
        .map_err(failed("list /sys/class/net".into()))?
        .flatten()
    {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().eq_ignore_ascii_case(&want) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(AgentError::NotFound(format!(
        "no guest network interface has MAC address {mac}"
    )))
}

fn socket() -> Result<OwnedFd, AgentError> {
    socket_of(libc::AF_INET)
}

fn socket_of(family: libc::c_int) -> Result<OwnedFd, AgentError> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(AgentError::Failed(format!(
            "socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, AgentError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(AgentError::Invalid(format!(
            "invalid interface name {name:?}"
        )));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// ioctl(2); `arg` must point to a live struct of the type `req` expects (and whatever it
/// points to must outlive the call).
fn raw_ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: the callers pass a valid struct for `req`, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl(
    fd: &OwnedFd,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    what: String,
) -> Result<(), AgentError> {
    raw_ioctl(fd, req, arg).map_err(failed(what))
}

/// An ioctl that adds something: already there (EEXIST) is success.
fn ioctl_add(
    fd: &OwnedFd,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    what: String,
) -> Result<(), AgentError> {
    match raw_ioctl(fd, req, arg) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(failed(what)(e)),
        _ => Ok(()),
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctls take it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_flags(fd: &OwnedFd, name: &str, up: bool) -> Result<(), AgentError> {
    let mut r = ifreq(name)?;
    ioctl(
        fd,
        libc::SIOCGIFFLAGS,
        &mut r as *mut _ as *mut _,
        format!("read flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        if up {
            r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        } else {
            r.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
        }
    }
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        &mut r as *mut _ as *mut _,
        format!("set {name} {}", if up { "up" } else { "down" }),
    )
}

/// Brings the loopback interface up.
pub fn loopback_up() -> Result<(), AgentError> {
    set_flags(&socket()?, "lo", true)
}

fn prefix_mask(prefix: u32) -> Result<Ipv4Addr, AgentError> {
    if prefix > 32 {
        return Err(AgentError::Invalid(format!(
            "IPv4 prefix length {prefix} is above 32"
        )));
    }
    Ok(Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }))
}

fn parse_v4(s: &str, what: &str) -> Result<Ipv4Addr, AgentError> {
    s.parse()
        .map_err(|_| AgentError::Invalid(format!("{what} {s:?} is not an IPv4 address")))
}

fn parse_v6(s: &str, what: &str) -> Result<Ipv6Addr, AgentError> {
    s.parse()
        .map_err(|_| AgentError::Invalid(format!("{what} {s:?} is not an IPv6 address")))
}

fn in6(ip: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

fn ifindex(name: &str) -> Result<libc::c_int, AgentError> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| AgentError::Invalid(format!("invalid interface name {name:?}")))?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(AgentError::NotFound(format!("no guest interface {name}")));
    }
    libc::c_int::try_from(i).map_err(|_| AgentError::Failed(format!("{name}: index {i}")))
}

/// Adds IPv6 address `addr`/`prefix` to `name`. Duplicate address detection is off for the
/// interface: the address was already checked on the pod's network, where the host holds it.
fn add_v6_address(name: &str, addr: &str, prefix: u32) -> Result<(), AgentError> {
    let ip = parse_v6(addr, "address")?;
    if prefix > 128 {
        return Err(AgentError::Invalid(format!(
            "IPv6 prefix length {prefix} is above 128"
        )));
    }
    let conf = format!("/proc/sys/net/ipv6/conf/{name}/accept_dad");
    std::fs::write(&conf, "0").map_err(|e| {
        AgentError::Failed(format!(
            "{name}: cannot turn off duplicate address detection ({conf}: {e}); does the guest kernel have IPv6?"
        ))
    })?;
    let fd = socket_of(libc::AF_INET6)?;
    let mut r = libc::in6_ifreq {
        ifr6_addr: in6(ip),
        ifr6_prefixlen: prefix,
        ifr6_ifindex: ifindex(name)?,
    };
    ioctl_add(
        &fd,
        libc::SIOCSIFADDR,
        &mut r as *mut _ as *mut _,
        format!("set address {addr}/{prefix} on {name}"),
    )
}

/// `struct in6_rtmsg` of <linux/ipv6_route.h> (the libc crate lacks it).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    typ: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn add_v6_route(dest: &str, gateway: &str, device: &str) -> Result<(), AgentError> {
    let (net, prefix) = match dest {
        "default" | "" => (Ipv6Addr::UNSPECIFIED, 0),
        _ => {
            let (a, p) = dest.split_once('/').unwrap_or((dest, "128"));
            let p: u16 = p.parse().ok().filter(|p| *p <= 128).ok_or_else(|| {
                AgentError::Invalid(format!("route destination {dest:?}: bad prefix length"))
            })?;
            (parse_v6(a, "route destination")?, p)
        }
    };
    let mut rt = In6Rtmsg {
        dst: in6(net),
        src: in6(Ipv6Addr::UNSPECIFIED),
        gateway: in6(Ipv6Addr::UNSPECIFIED),
        typ: 0,
        dst_len: prefix,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: libc::RTF_UP as u32,
        ifindex: 0,
    };
    if prefix == 128 {
        rt.flags |= libc::RTF_HOST as u32;
    }
    if !gateway.is_empty() {
        rt.gateway = in6(parse_v6(gateway, "gateway")?);
        rt.flags |= libc::RTF_GATEWAY as u32;
    }
    if !device.is_empty() {
        rt.ifindex = ifindex(device)?;
    }
    let fd = socket_of(libc::AF_INET6)?;
    ioctl_add(
        &fd,
        libc::SIOCADDRT,
        &mut rt as *mut _ as *mut _,
        format!("add route {dest} via {gateway:?} dev {device}"),
    )
}

/// Configures the NIC with MAC `mac`: renames it to `name`, sets the MTU and the (first) IPv4
/// address, and brings it up. Returns the interface name.
pub fn update_interface(
    name: &str,
    mac: &str,
    mtu: u64,
    addresses: &[(String, u32)],
) -> Result<String, AgentError> {
    let fd = socket()?;
    // A NIC hot-plugged a moment ago (a VM cloned from a template gets its NICs after it
    // starts) appears when the guest has probed it.
    let deadline = std::time::Instant::now() + NIC_APPEAR_TIMEOUT;
    let mut current = loop {
        match find_by_mac(mac) {
            Err(AgentError::NotFound(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r?,
        }
    };
    if !name.is_empty() && current != name {
        set_flags(&fd, &current, false)?;
        let mut r = ifreq(&current)?;
        let new = ifreq(name)?;
        r.ifr_ifru.ifru_newname = new.ifr_name;
        ioctl(
            &fd,
            libc::SIOCSIFNAME,
            &mut r as *mut _ as *mut _,
            format!("rename {current} to {name}"),
        )?;
        current = name.to_string();
    }
    if mtu > 0 {
        let mut r = ifreq(&current)?;
        r.ifr_ifru.ifru_mtu = i32::try_from(mtu)
            .map_err(|_| AgentError::Invalid(format!("MTU {mtu} is too large")))?;
        ioctl(
            &fd,
            libc::SIOCSIFMTU,
            &mut r as *mut _ as *mut _,
            format!("set the MTU of {current} to {mtu}"),
        )?;
    }
    let (v6, v4): (Vec<_>, Vec<_>) = addresses.iter().partition(|(a, _)| a.contains(':'));
    if v4.len() > 1 {
        return Err(AgentError::Invalid(format!(
            "{current}: more than one IPv4 address is not supported yet"
        )));
    }
    for (addr, prefix) in v6 {
        add_v6_address(&current, addr, *prefix)?;
    }
    if let Some((addr, prefix)) = v4.first() {
        let ip = parse_v4(addr, "address")?;
        let mut r = ifreq(&current)?;
        r.ifr_ifru.ifru_addr = sockaddr(ip);
        ioctl(
            &fd,
            libc::SIOCSIFADDR,
            &mut r as *mut _ as *mut _,
            format!("set address {addr} on {current}"),
        )?;
        let mut r = ifreq(&current)?;
        r.ifr_ifru.ifru_netmask = sockaddr(prefix_mask(*prefix)?);
        ioctl(
            &fd,
            libc::SIOCSIFNETMASK,
            &mut r as *mut _ as *mut _,
            format!("set prefix /{prefix} on {current}"),
        )?;
    }
    set_flags(&fd, &current, true)?;
    Ok(current)
}

/// Adds a route: `dest` is "default" or a CIDR; an empty gateway is a connected route (which
/// the kernel made with the address; an existing route is not an error).
pub fn add_route(dest: &str, gateway: &str, device: &str) -> Result<(), AgentError> {
    if dest.contains(':') || gateway.contains(':') {
        return add_v6_route(dest, gateway, device);
    }
    let fd = socket()?;
    let (net, prefix) = if dest == "default" || dest.is_empty() {
        (Ipv4Addr::UNSPECIFIED, 0)
    } else {
        let (a, p) = dest.split_once('/').unwrap_or((dest, "32"));
        let p: u32 = p.parse().map_err(|_| {
            AgentError::Invalid(format!("route destination {dest:?}: bad prefix length"))
        })?;
        (parse_v4(a, "route destination")?, p)
    };
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(net);
    rt.rt_genmask = sockaddr(prefix_mask(prefix)?);
    rt.rt_flags = libc::RTF_UP;
    if prefix == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    if !gateway.is_empty() {
        rt.rt_gateway = sockaddr(parse_v4(gateway, "gateway")?);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    let dev = std::ffi::CString::new(device)
        .map_err(|_| AgentError::Invalid(format!("invalid device name {device:?}")))?;
    if !device.is_empty() {
        rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    }
    // rt is a valid rtentry; rt_dev points into `dev`, alive for the call.
    ioctl_add(
        &fd,
        libc::SIOCADDRT,
        &mut rt as *mut _ as *mut _,
        format!("add route {dest} via {gateway:?} dev {device}"),
    )
}

/// Adds a permanent ARP entry.
pub fn add_neighbor(address: &str, mac: &str, device: &str) -> Result<(), AgentError> {
    let fd = socket()?;
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    req.arp_pa = sockaddr(parse_v4(address, "neighbour address")?);
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| AgentError::Invalid(format!("invalid MAC address {mac:?}")))?;
    if bytes.len() != 6 {
        return Err(AgentError::Invalid(format!("invalid MAC address {mac:?}")));
    }
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    req.arp_flags = libc::ATF_COM | libc::ATF_PERM;
    let dev = ifreq(device)?;
    for (d, s) in req.arp_dev.iter_mut().zip(dev.ifr_name) {
        *d = s;
    }
    ioctl(
        &fd,
        libc::SIOCSARP,
        &mut req as *mut _ as *mut _,
        format!("add neighbour {address} on {device}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_names() {
        assert_eq!(prefix_mask(24).ok(), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(prefix_mask(0).ok(), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(prefix_mask(32).ok(), Some(Ipv4Addr::BROADCAST));
        assert!(prefix_mask(33).is_err());
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err() && ifreq("a-name-far-too-long").is_err());
        assert!(parse_v4("2001:db8::1", "address").is_err());
        assert!(parse_v6("2001:db8::1", "address").is_ok());
        assert_eq!(
            std::mem::size_of::<In6Rtmsg>(),
            80,
            "struct in6_rtmsg on x86_64"
        );
    }
}
