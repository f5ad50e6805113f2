//! kata-monitor's HTTP endpoints.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | own families, then every sandbox's, each sample labelled `sandbox_id`, `cri_uid`, `cri_name`, `cri_namespace` |
//! | `/metrics?sandbox=ID` | that sandbox's shim `/metrics`, verbatim |
//! | `/metrics?filter_family=a,b` | only the families whose names start with `a` or `b` |
//! | `/sandboxes` | the sandbox ids, one per line |
//! | `/agent-url?sandbox=ID` | that sandbox's agent URL |
//! | `/` | an index of these |
//!
//! Unknown paths: 404; methods other than GET: 405.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::scrape::Monitor;
use kata_sandbox::monitor_client::query_param;

const INDEX: &str = "kata-monitor: metrics of the Kata Containers sandboxes on this host\n\n\
/metrics                      every sandbox's metrics, labelled with sandbox_id, cri_uid, cri_name, cri_namespace\n\
/metrics?sandbox=ID           one sandbox's metrics, as its shim serves them\n\
/metrics?filter_family=a,b    only the families whose names start with a or b\n\
/sandboxes                    the sandboxes, one id per line\n\
/agent-url?sandbox=ID         the agent URL of a sandbox\n";

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// A sandbox named in a query, checked to be one this host runs.
fn sandbox_param(m: &Monitor, query: Option<&str>) -> Result<String, (StatusCode, String)> {
    let Some(id) = query_param(query, "sandbox") else {
        return Err((
            StatusCode::BAD_REQUEST,
            "missing query parameter: sandbox=<id>\n".to_string(),
        ));
    };
    if !crate::discovery::sandboxes(&m.discovery.dir).contains(&id) {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "sandbox {id} not found under {}\n",
                m.discovery.dir.display()
            ),
        ));
    }
    Ok(id)
}

/// Answers one request.
pub async fn handle(req: Request<Incoming>, m: Arc<Monitor>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let known = ["/", "/metrics", "/sandboxes", "/agent-url"];
    if !known.contains(&path.as_str()) {
        return reply(StatusCode::NOT_FOUND, "URL NOT FOUND\n");
    }
    if req.method() != Method::GET {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        if let Ok(v) = "GET".parse() {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return r;
    }
    match path.as_str() {
        "/" => reply(StatusCode::OK, INDEX),
        "/sandboxes" => {
            let ids = crate::discovery::sandboxes(&m.discovery.dir);
            let mut body = ids.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            reply(StatusCode::OK, body)
        }
        "/agent-url" => match sandbox_param(&m, query.as_deref()) {
            Err((status, msg)) => reply(status, msg),
            Ok(id) => {
                let sock = m.discovery.dir.join(&id).join("shim-monitor.sock");
                match tokio::time::timeout(
                    m.timeout,
                    kata_sandbox::monitor_client::request(
                        &sock,
                        Method::GET,
                        "/agent-url",
                        Vec::new(),
                    ),
                )
                .await
                {
                    Ok(Ok((status, body))) => reply(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        body,
                    ),
                    _ => reply(
                        StatusCode::BAD_GATEWAY,
                        format!("the shim of sandbox {id} did not answer\n"),
                    ),
                }
            }
        },
        _ => {
            if query_param(query.as_deref(), "sandbox").is_some() {
                return match sandbox_param(&m, query.as_deref()) {
                    Err((status, msg)) => reply(status, msg),
                    Ok(id) => {
                        let sock = m.discovery.dir.join(&id).join("shim-monitor.sock");
                        match crate::scrape::shim_metrics(&sock, m.timeout).await {
                            Ok(text) => metrics_reply(text),
                            Err(e) => {
                                reply(StatusCode::BAD_GATEWAY, format!("sandbox {id}: {e}\n"))
                            }
                        }
                    }
                };
            }
            let filter: Vec<String> = query_param(query.as_deref(), "filter_family")
                .map(|f| {
                    f.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            metrics_reply(m.metrics(&filter).await)
        }
    }
}

fn metrics_reply(text: String) -> Response<Full<Bytes>> {
    let mut r = reply(StatusCode::OK, text);
    if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, m: Arc<Monitor>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let m = m.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move { Ok::<_, Infallible>(handle(req, m).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
