//! CRI-O: the runtimes `kata` and `kata-qemu` as a drop-in in `crio.conf.d` (CRI-O reads every
//! file there after `crio.conf`, in name order, so `99-kata-deploy` comes last), with
//! `runtime_type = "vm"`: CRI-O then speaks the shim v2 API to `containerd-shim-kata-v2` as
//! containerd does. After a restart CRI-O's own HTTP API on its socket (`GET /config`, what
//! `crio status config` prints) shows the runtimes it runs with.

use std::path::{Path, PathBuf};

use toml_edit::{value, DocumentMut, Item, Table};

use crate::{manager, DeployError, HANDLERS};

/// The drop-in's name in CRI-O's configuration directory (Kata's own name for it).
pub const DROP_IN: &str = "99-kata-deploy";

/// The drop-in's path in `dir` (a host path, `/etc/crio/crio.conf.d` by default).
pub fn drop_in_path(dir: &Path) -> PathBuf {
    dir.join(DROP_IN)
}

/// The drop-in's text for runtimes installed at `prefix`.
pub fn drop_in(prefix: &Path) -> String {
    let mut runtimes = Table::new();
    runtimes.set_implicit(true);
    for h in &HANDLERS {
        let mut t = Table::new();
        t.insert("runtime_path", value(h.shim_path(prefix)));
        t.insert("runtime_type", value("vm"));
        t.insert("runtime_root", value("/run/vc"));
        t.insert("runtime_config_path", value(h.config_path(prefix)));
        t.insert("privileged_without_host_devices", value(true));
        runtimes.insert(h.name, Item::Table(t));
    }
    let mut runtime = Table::new();
    runtime.set_implicit(true);
    runtime.insert("runtimes", Item::Table(runtimes));
    let mut crio = Table::new();
    crio.set_implicit(true);
    crio.insert("runtime", Item::Table(runtime));
    let mut doc = DocumentMut::new();
    doc.insert("crio", Item::Table(crio));
    format!("# Written by kata-deploy; removed by `kata-deploy uninstall`.\n{doc}")
}

/// The runtime names in a CRI-O configuration's text (`crio.runtime.runtimes`).
pub fn handlers_in(text: &str) -> Result<Vec<String>, DeployError> {
    let doc: DocumentMut = text
        .parse()
        .map_err(|e| manager(format!("CRI-O's configuration is not TOML: {e}")))?;
    let runtimes = doc
        .get("crio")
        .and_then(|c| c.get("runtime"))
        .and_then(|r| r.get("runtimes"))
        .and_then(Item::as_table_like)
        .ok_or_else(|| manager("CRI-O's configuration has no crio.runtime.runtimes"))?;
    let mut names: Vec<String> = runtimes.iter().map(|(k, _)| k.to_string()).collect();
    names.sort();
    Ok(names)
}

/// The body of an HTTP/1.0 response, if its status is 200.
pub fn http_body(response: &[u8]) -> Result<&[u8], DeployError> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| manager("CRI-O's answer is not HTTP: no end of its header"))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(manager(format!("CRI-O answered `{status}`")));
    }
    Ok(&response[end + 4..])
}

/// CRI-O's running configuration, from its HTTP API on `socket`.
pub async fn running_config(socket: &Path) -> Result<String, DeployError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| manager(format!("connect to {}: {e}", socket.display())))?;
    s.write_all(b"GET /config HTTP/1.0\r\nHost: crio\r\n\r\n")
        .await
        .map_err(|e| manager(format!("CRI-O's GET /config: {e}")))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .map_err(|e| manager(format!("CRI-O's GET /config: {e}")))?;
    Ok(String::from_utf8_lossy(http_body(&buf)?).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_in_names_each_handler_as_a_vm_runtime() {
        let text = drop_in(Path::new("/opt/kata"));
        assert_eq!(handlers_in(&text).expect("parse"), ["kata", "kata-qemu"]);
        let doc: DocumentMut = text.parse().expect("toml");
        let kata = &doc["crio"]["runtime"]["runtimes"]["kata"];
        assert_eq!(kata["runtime_type"].as_str(), Some("vm"));
        assert_eq!(
            kata["runtime_path"].as_str(),
            Some("/opt/kata/bin/containerd-shim-kata-v2")
        );
        assert_eq!(
            kata["runtime_config_path"].as_str(),
            Some("/opt/kata/share/defaults/kata-containers/configuration.toml")
        );
        let qemu = &doc["crio"]["runtime"]["runtimes"]["kata-qemu"];
        assert_eq!(
            qemu["runtime_path"].as_str(),
            Some("/opt/kata/bin/containerd-shim-kata-qemu-v2")
        );
        // No empty `[crio]` or `[crio.runtime]` headers: only the runtimes' tables.
        assert!(!text.contains("[crio]\n") && !text.contains("[crio.runtime]\n"));
        assert!(text.contains("[crio.runtime.runtimes.kata]"));
    }

    #[test]
    fn the_running_configuration_and_http_answers() {
        let running = "[crio.runtime]\ndefault_runtime = \"crun\"\n[crio.runtime.runtimes.crun]\n\
                       runtime_path = \"/usr/bin/crun\"\n[crio.runtime.runtimes.kata]\nruntime_type = \"vm\"\n";
        assert_eq!(handlers_in(running).expect("parse"), ["crun", "kata"]);
        assert!(handlers_in("[crio]\n").is_err());
        assert!(handlers_in("[crio\n").is_err());
        assert_eq!(
            http_body(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody").expect("200"),
            b"body"
        );
        assert!(http_body(b"HTTP/1.0 404 Not Found\r\n\r\n").is_err());
        assert!(http_body(b"garbage").is_err());
    }
}
