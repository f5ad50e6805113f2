//! The node's label through the real Kubernetes client library (kube), against a local HTTP
//! server that answers the two calls the installer makes (there is no API server here): GET
//! and a merge PATCH of `/api/v1/nodes/NAME`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// The fake API server's node labels and the calls it saw.
#[derive(Default)]
struct ApiState {
    labels: BTreeMap<String, String>,
    calls: Vec<String>,
}

fn node_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": "node-1", "labels": labels }
    })
    .to_string()
}

fn serve(state: Arc<Mutex<ApiState>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let state = state.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) = (
                        parts.next().unwrap_or("").to_string(),
                        parts.next().unwrap_or("").to_string(),
                    );
                    let (mut len, mut ctype) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).expect("header");
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap_or((h, ""));
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap_or(0),
                            "content-type" => ctype = v.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).expect("body");
                    let mut s = state.lock().expect("state");
                    s.calls.push(format!("{method} {path} {ctype}"));
                    let (code, out) = match (method.as_str(), path.as_str()) {
                        ("GET", "/api/v1/nodes/node-1") => (200, node_json(&s.labels)),
                        ("PATCH", p) if p.starts_with("/api/v1/nodes/node-1") => {
                            let patch: serde_json::Value =
                                serde_json::from_slice(&body).expect("patch JSON");
                            if let Some(l) = patch.pointer("/metadata/labels").and_then(|l| l.as_object()) {
                                for (k, v) in l {
                                    match v.as_str() {
                                        Some(v) => s.labels.insert(k.clone(), v.to_string()),
                                        None => s.labels.remove(k),
                                    };
                                }
                            }
                            (200, node_json(&s.labels))
                        }
                        _ => (404, r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#.to_string()),
                    };
                    let _ = write!(
                        w,
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{out}",
                        out.len()
                    );
                }
            });
        }
    });
    url
}

#[test]
fn the_node_is_labelled_and_unlabelled_through_the_kubernetes_api() {
    let state = Arc::new(Mutex::new(ApiState::default()));
    state
        .lock()
        .expect("state")
        .labels
        .insert("kubernetes.io/hostname".into(), "node-1".into());
    let url = serve(state.clone());
    let label = kata_deploy::label::LABEL;
    kata_deploy::label::set("node-1", Some("true"), Some(&url)).expect("label");
    assert_eq!(
        state
            .lock()
            .expect("state")
            .labels
            .get(label)
            .map(String::as_str),
        Some("true")
    );
    // Again: already there, nothing patched.
    kata_deploy::label::set("node-1", Some("true"), Some(&url)).expect("label again");
    kata_deploy::label::set("node-1", None, Some(&url)).expect("unlabel");
    let s = state.lock().expect("state");
    assert_eq!(s.labels.get(label), None);
    assert_eq!(
        s.labels.get("kubernetes.io/hostname").map(String::as_str),
        Some("node-1"),
        "other labels kept"
    );
    let patches: Vec<&String> = s.calls.iter().filter(|c| c.starts_with("PATCH")).collect();
    assert_eq!(patches.len(), 2, "{:?}", s.calls);
    assert!(
        patches
            .iter()
            .all(|c| c.ends_with("application/merge-patch+json")),
        "{patches:?}"
    );
    drop(s);
    // A node the API does not know: a clear error.
    let e = kata_deploy::label::set("node-2", Some("true"), Some(&url)).expect_err("no node");
    assert!(e.to_string().contains("get the node"), "{e}");
}
