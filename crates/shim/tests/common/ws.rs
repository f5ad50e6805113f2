//! The kubelet's websocket streaming protocols, spoken to containerd's streaming server (the
//! conformance suite's streaming checks and the bench's cri_streaming): `v4.channel.k8s.io`, one
//! leading channel byte per message (0 stdin, 1 stdout, 2 stderr, 3 the status, 4 terminal
//! resize); port-forward, a data and an error channel per port, each opened with the port's two
//! bytes, little-endian.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A TCP connection to `addr` made inside containerd's network namespace (the test set-up
/// runs containerd in one of its own, where its streaming server listens on 127.0.0.1).
pub fn connect_in_netns(netns: &str, addr: &str) -> std::net::TcpStream {
    let ns = format!("/run/netns/{netns}");
    let ns = std::fs::File::open(&ns).unwrap_or_else(|e| panic!("{ns}: {e}"));
    let addr = addr.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    })
    .join()
    .expect("connect thread")
}

/// Connects to a streaming URL (`http://HOST:PORT/...`) of the test set-up's containerd with the
/// kubelet's channel protocol.
pub async fn connect(url: &str) -> Ws {
    connect_in(&super::containerd(&["netns"]), url).await
}

/// [`connect`] for the containerd running in network namespace `netns` (`ip netns` name).
pub async fn connect_in(netns: &str, url: &str) -> Ws {
    let url = url.replacen("http://", "ws://", 1);
    let mut req = url.as_str().into_client_request().expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().expect("header"),
    );
    let authority = req.uri().authority().expect("host:port").to_string();
    let tcp = connect_in_netns(netns, &authority);
    tcp.set_nonblocking(true).expect("nonblocking");
    let tcp = tokio::net::TcpStream::from_std(tcp).expect("tokio stream");
    let (ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .unwrap_or_else(|e| panic!("websocket {url}: {e}"));
    ws
}

pub async fn send(ws: &mut Ws, channel: u8, data: &[u8]) {
    let mut m = vec![channel];
    m.extend_from_slice(data);
    ws.send(Message::Binary(m)).await.expect("send");
}

/// Everything received per channel until the server closes (at most `within`).
pub async fn drain(ws: &mut Ws, within: Duration) -> BTreeMap<u8, Vec<u8>> {
    let mut got: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(m)))) => {
                if let Some((c, rest)) = m.split_first() {
                    got.entry(*c).or_default().extend_from_slice(rest);
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return got,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the stream did not end in {within:?}; got {got:?}"),
        }
    }
}

/// Reads until channel `channel` holds `needle` (at most `within`); what was read.
pub async fn read_until(ws: &mut Ws, channel: u8, needle: &str, within: Duration) -> String {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while !String::from_utf8_lossy(&got).contains(needle) {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(m)))) if m.first() == Some(&channel) => {
                got.extend_from_slice(&m[1..])
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no {needle:?} on channel {channel}: {other:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// What channel `channel` carried, as text.
pub fn text(got: &BTreeMap<u8, Vec<u8>>, channel: u8) -> String {
    String::from_utf8_lossy(got.get(&channel).map(Vec::as_slice).unwrap_or_default()).into_owned()
}
