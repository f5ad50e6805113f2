//! Container logs in the CRI format (`<RFC 3339 time> <stream> <P|F> <text>`): stdout and
//! stderr apart, a line over 16 KiB split into partial lines, `ReopenContainerLog` after the
//! kubelet rotated the file, and a terminal's output.

use super::*;

/// (stream, tag, text) of each line of a CRI log file, in order; a text longer than 32 bytes
/// is kept as its length and first byte (`<N x c>`). Panics on a line not in the CRI format.
fn parse(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let (time, stream, tag) = (parts.next(), parts.next(), parts.next());
            let body = parts.next().unwrap_or("");
            let time = time.unwrap_or("");
            assert!(
                time.len() >= 20 && time.as_bytes()[4] == b'-' && time.contains('T'),
                "not an RFC 3339 time: {l:?}"
            );
            let body = if body.len() > 32 {
                format!("<{} x {}>", body.len(), &body[..1])
            } else {
                body.to_string()
            };
            (
                stream.unwrap_or("").to_string(),
                tag.unwrap_or("").to_string(),
                body,
            )
        })
        .collect()
}

async fn wait_for_file(path: &std::path::Path, needle: &str) -> String {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never had {needle:?}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn logs_in_the_cri_format_as_with_runc() {
    let seen = each_handler(|handler| async move {
        let mut pod = Pod::run(handler, "cf-logs", |_| {}).await;
        let out = pod
            .start(
                "out",
                &[
                    "sh",
                    "-c",
                    "echo out-line; echo err-line >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; echo done",
                ],
                |_| {},
            )
            .await;
        pod.wait_exited(&out, Duration::from_secs(30)).await;
        let text = wait_for_file(&pod.logs.join("out.log"), "done").await;
        let lines = parse(&text);
        let stdout: Vec<_> = lines.iter().filter(|l| l.0 == "stdout").cloned().collect();
        let stderr: Vec<_> = lines.iter().filter(|l| l.0 == "stderr").cloned().collect();
        // The kubelet rotates: it renames the file and asks for a new one.
        let ticker = pod
            .start(
                "ticker",
                &["sh", "-c", "i=0; while :; do echo tick-$i; i=$((i+1)); sleep 0.1; done"],
                |_| {},
            )
            .await;
        let log = pod.logs.join("ticker.log");
        wait_for_file(&log, "tick-5").await;
        let rotated = pod.logs.join("ticker.log.1");
        std::fs::rename(&log, &rotated).expect("rotate");
        pod.c
            .reopen_container_log(ReopenContainerLogRequest {
                container_id: ticker.clone(),
            })
            .await
            .expect("ReopenContainerLog");
        let fresh = wait_for_file(&log, "tick-").await;
        let last_old = parse(&std::fs::read_to_string(&rotated).unwrap_or_default())
            .last()
            .map(|l| l.2.clone())
            .unwrap_or_default();
        let first_new = parse(&fresh).first().map(|l| l.2.clone()).unwrap_or_default();
        let number = |s: &str| s.trim_start_matches("tick-").parse::<u64>().unwrap_or(0);
        let continues = number(&first_new) == number(&last_old) + 1;
        let tty = pod
            .start("tty", &["sh", "-c", "echo tty-line"], |c| {
                c.tty = true;
            })
            .await;
        pod.wait_exited(&tty, Duration::from_secs(30)).await;
        let tty_lines = parse(&wait_for_file(&pod.logs.join("tty.log"), "tty-line").await);
        pod.remove().await;
        (stdout, stderr, continues, tty_lines)
    })
    .await;
    let (stdout, stderr, continues, tty) = &seen["runc"];
    let line = |s: &str, t: &str, b: &str| (s.to_string(), t.to_string(), b.to_string());
    assert_eq!(
        stdout,
        &vec![
            line("stdout", "F", "out-line"),
            line("stdout", "P", "<16384 x x>"),
            line("stdout", "F", "<3616 x x>"),
            line("stdout", "F", "done"),
        ],
        "the oracle's stdout"
    );
    assert_eq!(
        stderr,
        &vec![line("stderr", "F", "err-line")],
        "the oracle's stderr"
    );
    assert!(continues, "the oracle's rotation lost or repeated a line");
    assert_eq!(tty.len(), 1, "the oracle's tty log: {tty:?}");
    assert_same("logs", &seen);
}
