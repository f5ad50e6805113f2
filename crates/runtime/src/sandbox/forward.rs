//! Port forwarding (the kubelet's `kubectl port-forward`): containerd's CRI plugin serves it by
//! dialing `localhost:PORT` inside the pod's network namespace on the host, where, for a VM,
//! nothing listens: the pod's processes run in the guest. The sandbox therefore keeps a relay
//! there: listeners on the namespace's loopback (127.0.0.1 and ::1) that a nat `REDIRECT`
//! rule of that namespace sends every loopback TCP connection to; each connection's original
//! port (`SO_ORIGINAL_DST`) is opened by the agent on the guest's loopback
//! (PortForwardOpen), and the bytes are relayed both ways through the agent's channel. A
//! server in the pod listening on 127.0.0.1 or on 0.0.0.0 is reached, as with runc.
//!
//! The rules live in the pod's namespace only and go with it; nothing on the host changes.

use std::os::fd::AsRawFd;
use std::path::Path;

use kata_protocols::agent::{
    PortForwardCloseRequest, PortForwardOpenRequest, PortForwardReadRequest,
    PortForwardWriteRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{agent_err, ctx, AgentClient, CALL_TIMEOUT};
use crate::error::SandboxError;

/// Bytes read from the client at once.
const CHUNK: usize = 128 * 1024;

/// The relay of a sandbox: stops when dropped.
#[derive(Debug)]
pub struct Relay {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The listeners made in the namespace.
struct Listeners {
    v4: std::net::TcpListener,
    v6: Option<std::net::TcpListener>,
}

fn fail(netns: &Path, what: &str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Network(format!(
        "port-forward relay in {}: {what}: {e}",
        netns.display()
    ))
}

/// The nat rule that sends loopback TCP connections (other than to the relay itself) to the
/// relay's `port`.
pub fn redirect_rule(v6: bool, port: u16) -> Vec<String> {
    let dst = if v6 { "::1/128" } else { "127.0.0.1/32" };
    [
        "-w", "5", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-d", dst, "!", "--dport",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        port.to_string(),
        "-j".into(),
        "REDIRECT".into(),
        "--to-ports".into(),
        port.to_string(),
    ])
    .collect()
}

/// Binds the listeners inside `netns` and adds the redirect rules there (the commands run from
/// a thread inside the namespace, so they act on it).
fn listen_in(netns: &Path) -> Result<Listeners, SandboxError> {
    let ns = std::fs::File::open(netns).map_err(|e| fail(netns, "open the namespace", e))?;
    let path = netns.to_path_buf();
    std::thread::spawn(move || -> Result<Listeners, SandboxError> {
        // SAFETY: setns(2) on a namespace descriptor this thread holds open; only this thread
        // changes namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(fail(&path, "setns", std::io::Error::last_os_error()));
        }
        let rule = |tool: &str, v6: bool, port: u16| -> Result<(), SandboxError> {
            let out = std::process::Command::new(tool)
                .args(redirect_rule(v6, port))
                .output()
                .map_err(|e| fail(&path, &format!("run {tool}"), e))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(fail(
                    &path,
                    &format!("{tool} {}", redirect_rule(v6, port).join(" ")),
                    String::from_utf8_lossy(&out.stderr).trim(),
                ))
            }
        };
        let v4 = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| fail(&path, "listen on 127.0.0.1", e))?;
        let port = v4
            .local_addr()
            .map_err(|e| fail(&path, "local address", e))?
            .port();
        rule("iptables", false, port)?;
        // IPv6 where the namespace has a loopback address for it (containerd 2.x tries ::1
        // after 127.0.0.1); without one, IPv4 serves.
        let v6 = match std::net::TcpListener::bind("[::1]:0") {
            Ok(l) => {
                let port = l
                    .local_addr()
                    .map_err(|e| fail(&path, "local address", e))?
                    .port();
                match rule("ip6tables", true, port) {
                    Ok(()) => Some(l),
                    Err(e) => {
                        tracing::warn!("{e}; port-forward over IPv6 loopback unavailable");
                        None
                    }
                }
            }
            Err(_) => None,
        };
        v4.set_nonblocking(true)
            .map_err(|e| fail(&path, "nonblocking", e))?;
        if let Some(l) = &v6 {
            l.set_nonblocking(true)
                .map_err(|e| fail(&path, "nonblocking", e))?;
        }
        Ok(Listeners { v4, v6 })
    })
    .join()
    .map_err(|_| fail(netns, "thread", "panicked"))?
}

/// The port a redirected connection was made to (`SO_ORIGINAL_DST`).
fn original_port(sock: &tokio::net::TcpStream, v6: bool) -> std::io::Result<u16> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = sock.as_raw_fd();
    if v6 {
        // SAFETY: a zeroed sockaddr_in6 is valid; getsockopt(2) fills at most `len` bytes.
        let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                &mut a as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(u16::from_be(a.sin6_port))
    } else {
        // SAFETY: as above, for sockaddr_in.
        let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                &mut a as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(u16::from_be(a.sin_port))
    }
}

/// Starts the relay in the pod's network namespace `netns`. The namespace's set-up (the
/// listeners, two `iptables` runs) happens in the relay's own task, off the sandbox's boot; a
/// failure there is logged (port-forward then fails as it did without the relay).
pub fn start(netns: &Path, agent: &AgentClient) -> Relay {
    let netns = netns.to_path_buf();
    let agent = agent.clone();
    let task = tokio::spawn(async move {
        let ns = netns.clone();
        let l = match tokio::task::spawn_blocking(move || listen_in(&ns)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::warn!("{e}; kubectl port-forward will not reach this pod");
                return;
            }
            Err(_) => return,
        };
        let v4 = serve(l.v4, false, &agent, &netns);
        let v6 = async {
            if let Some(l) = l.v6 {
                serve(l, true, &agent, &netns).await;
            }
        };
        tokio::join!(v4, v6);
    });
    Relay { task }
}

/// Accepts redirected connections on one listener and relays each.
async fn serve(l: std::net::TcpListener, v6: bool, agent: &AgentClient, netns: &Path) {
    let listener = match tokio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("{}", fail(netns, "listener", e));
            return;
        }
    };
    let own = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!("{}", fail(netns, "accept", e));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let port = match original_port(&sock, v6) {
            Ok(p) if p != own => p,
            _ => continue, // Not redirected: nobody's connection to forward.
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(&agent, sock, port).await {
                tracing::warn!("port-forward to port {port}: {e}");
            }
        });
    }
}

/// Relays one connection to `port` in the guest until both sides closed.
async fn relay(
    agent: &AgentClient,
    sock: tokio::net::TcpStream,
    port: u16,
) -> Result<(), SandboxError> {
    let _ = sock.set_nodelay(true);
    let open = PortForwardOpenRequest {
        port: u32::from(port),
        ..Default::default()
    };
    let id = agent
        .agent
        .port_forward_open(ctx(CALL_TIMEOUT), &open)
        .await
        .map_err(agent_err("PortForwardOpen"))?
        .id;
    let (mut r, mut w) = sock.into_split();
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await.unwrap_or(0);
            let req = PortForwardWriteRequest {
                id,
                data: buf[..n].to_vec(),
                ..Default::default()
            };
            let sent = agent
                .agent
                .port_forward_write(ctx(CALL_TIMEOUT), &req)
                .await;
            if n == 0 || sent.is_err() {
                return;
            }
        }
    };
    let down = async {
        loop {
            let req = PortForwardReadRequest {
                id,
                len: CHUNK as u32,
                ..Default::default()
            };
            let data = match agent
                .agent
                .port_forward_read(ttrpc::context::with_timeout(0), &req)
                .await
            {
                Ok(r) => r.data,
                Err(_) => Vec::new(),
            };
            if data.is_empty() || w.write_all(&data).await.is_err() {
                let _ = w.shutdown().await;
                return;
            }
        }
    };
    tokio::join!(up, down);
    let close = PortForwardCloseRequest {
        id,
        ..Default::default()
    };
    let _ = agent
        .agent
        .port_forward_close(ctx(CALL_TIMEOUT), &close)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_spares_the_relays_own_port() {
        assert_eq!(
            redirect_rule(false, 4000).join(" "),
            "-w 5 -t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1/32 ! --dport 4000 -j REDIRECT --to-ports 4000"
        );
        assert!(redirect_rule(true, 5)
            .join(" ")
            .contains("-d ::1/128 ! --dport 5"));
    }
}
