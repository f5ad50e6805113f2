//! Streaming, the kubelet's `kubectl exec -it`, `attach` and `port-forward` path: CRI Exec,
//! Attach and PortForward return a URL of containerd's streaming server, driven here over the
//! websocket protocols the kubelet's server speaks (`v4.channel.k8s.io`: one leading channel
//! byte per message, 0 stdin, 1 stdout, 2 stderr, 3 the status, 4 terminal resize; port-forward:
//! a data and an error channel per port, each opened with the port's two bytes).

use super::*;

use common::ws::{connect, drain, read_until, send, text};

/// The exit code in a v4 status message (`{"status":"Success"}` is 0).
fn exit_code(status: &[u8]) -> i32 {
    let s = String::from_utf8_lossy(status);
    if s.contains("\"Success\"") {
        return 0;
    }
    // {"...","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}
    s.split("\"reason\":\"ExitCode\",\"message\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit code in the status {s}"))
}

/// What one handler's streams gave.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Exec without a terminal: stdout, stderr, exit code.
    exec: (String, String, i32),
    /// Exec with a terminal: the size `stty` printed after a resize, the exit code.
    tty: (String, i32),
    /// Attach: the running container's answer to a line on its stdin.
    attach: String,
    /// Port-forward to 127.0.0.1:8080 and 0.0.0.0:8081: the status line and body size.
    forward: Vec<(String, usize)>,
}

const BLOB_MIB: usize = 8;

/// An HTTP/1.0 GET of `path` through a port-forward of `port`: the status line, the body size,
/// and the time the body took.
async fn get_forwarded(pod: &mut Pod, port: i32, path: &str) -> (String, usize, Duration) {
    let url = pod
        .c
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.id.clone(),
            port: vec![port],
        })
        .await
        .unwrap_or_else(|e| panic!("{}: PortForward: {e}", pod.handler))
        .into_inner()
        .url;
    let mut ws = connect(&format!("{url}?port={port}")).await;
    let t = Instant::now();
    send(
        &mut ws,
        0,
        format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    let got = drain(&mut ws, Duration::from_secs(120)).await;
    let took = t.elapsed();
    let data = got.get(&0).cloned().unwrap_or_default();
    // Each channel opens with the port, little-endian.
    let port_bytes = (port as u16).to_le_bytes();
    assert!(
        data.starts_with(&port_bytes),
        "{}: port-forward data channel {data:?}; error channel {:?}",
        pod.handler,
        text(&got, 1)
    );
    let http = &data[2..];
    let head_end = http
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{}: no HTTP answer through port-forward {port}: {:?}; error channel {:?}",
                pod.handler,
                String::from_utf8_lossy(http),
                text(&got, 1)
            )
        });
    let status = String::from_utf8_lossy(&http[..head_end])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    (status, http.len() - head_end - 4, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn exec_attach_and_port_forward_over_the_streaming_server() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-stream", |_| {}).await;
        let server = format!(
            "mkdir -p /www && head -c {} /dev/zero > /www/blob && echo ok > /www/ok && \
             httpd -p 127.0.0.1:8080 -h /www && httpd -p 8081 -h /www && \
             while read x; do echo got:$x; done",
            BLOB_MIB << 20
        );
        let app = pod
            .start("app", &["sh", "-c", &server], |c| {
                c.stdin = true;
            })
            .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while pod
            .exec(&app, &["wget", "-q", "-O", "-", "http://127.0.0.1:8081/ok"])
            .await
            .1
            != 0
        {
            assert!(Instant::now() < deadline, "{handler}: httpd never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Exec without a terminal: stdin in, stdout and stderr apart, the exit code.
        let url = pod
            .c
            .exec(ExecRequest {
                container_id: app.clone(),
                cmd: ["sh", "-c", "read x; echo out:$x; echo err:$x >&2; exit 3"]
                    .map(String::from)
                    .to_vec(),
                tty: false,
                stdin: true,
                stdout: true,
                stderr: true,
            })
            .await
            .unwrap_or_else(|e| panic!("{handler}: Exec: {e}"))
            .into_inner()
            .url;
        let mut ws = connect(&url).await;
        send(&mut ws, 0, b"hello\n").await;
        let got = drain(&mut ws, Duration::from_secs(30)).await;
        let exec = (text(&got, 1), text(&got, 2), exit_code(&got[&3]));

        // Exec with a terminal: a resize, then what the shell sees.
        let url = pod
            .c
            .exec(ExecRequest {
                container_id: app.clone(),
                cmd: vec!["sh".into()],
                tty: true,
                stdin: true,
                stdout: true,
                stderr: false,
            })
            .await
            .unwrap_or_else(|e| panic!("{handler}: Exec tty: {e}"))
            .into_inner()
            .url;
        let mut ws = connect(&url).await;
        send(&mut ws, 4, br#"{"Width":100,"Height":40}"#).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        send(&mut ws, 0, b"stty size; exit 5\n").await;
        let got = drain(&mut ws, Duration::from_secs(30)).await;
        let out = text(&got, 1);
        let size = out
            .lines()
            .map(str::trim)
            .find(|l| l.split(' ').all(|w| w.parse::<u32>().is_ok()) && l.contains(' '))
            .unwrap_or_else(|| panic!("{handler}: no size in the terminal's output {out:?}"))
            .to_string();
        let tty = (size, exit_code(&got[&3]));

        // Attach to the running container: a line on its stdin, its answer.
        let url = pod
            .c
            .attach(AttachRequest {
                container_id: app.clone(),
                stdin: true,
                tty: false,
                stdout: true,
                stderr: true,
            })
            .await
            .unwrap_or_else(|e| panic!("{handler}: Attach: {e}"))
            .into_inner()
            .url;
        let mut ws = connect(&url).await;
        send(&mut ws, 0, b"ping\n").await;
        let attach = read_until(&mut ws, 1, "got:ping", Duration::from_secs(30)).await;
        let _ = ws.close(None).await;

        // Port-forward to a server on the pod's loopback and to one on every address.
        let mut forward = Vec::new();
        let mut speed = Vec::new();
        for port in [8080, 8081] {
            let (status, size, took) = get_forwarded(&mut pod, port, "/blob").await;
            speed.push(format!(
                "port {port}: {:.1} MiB/s",
                size as f64 / (1 << 20) as f64 / took.as_secs_f64()
            ));
            forward.push((status, size));
        }
        eprintln!(
            "{handler}: port-forward of {BLOB_MIB} MiB: {}",
            speed.join(", ")
        );
        pod.remove().await;
        Seen {
            exec,
            tty,
            attach: attach.trim().to_string(),
            forward,
        }
    })
    .await;
    assert_eq!(
        seen["runc"].exec,
        ("out:hello\n".to_string(), "err:hello\n".to_string(), 3),
        "the oracle"
    );
    assert_eq!(seen["runc"].tty, ("40 100".to_string(), 5), "the oracle");
    assert_eq!(
        seen["runc"].forward,
        vec![("HTTP/1.1 200 OK".to_string(), BLOB_MIB << 20); 2],
        "the oracle"
    );
    assert_same("exec, attach and port-forward", &seen);
}
