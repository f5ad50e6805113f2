//! A client of a shim's monitor socket (`/run/vc/sbs/<sandbox-id>/shim-monitor.sock`): one
//! HTTP/1.1 request over the unix socket, bounded in time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How long a request may take (Kata's clients use 3 s).
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a direct volume's resize may take: QEMU's `block_resize`, then the guest grows the
/// filesystem online, which under TCG takes tens of seconds for a large one (the runtime's own
/// bound, [`kata_sandbox::RESIZE_VOLUME_TIMEOUT`], plus a margin).
pub const RESIZE_TIMEOUT: Duration =
    Duration::from_secs(kata_sandbox::RESIZE_VOLUME_TIMEOUT.as_secs() + 10);

/// Checks that `id` can name a sandbox (no path separators or dot names).
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id == "."
        || id == ".."
        || id.len() > 256
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("{id:?} is not a sandbox id (letters, digits, '-', '_' and '.' only)");
    }
    Ok(())
}

/// The monitor socket of sandbox `id`, which must exist.
pub fn socket(id: &str) -> Result<PathBuf> {
    check_id(id)?;
    let path = kata_sandbox::sandbox::monitor_socket(id);
    if !path.exists() {
        bail!(
            "sandbox {id} not found: no shim monitor socket at {} (is the sandbox running on this host? 'ctr task ls' or 'crictl pods' list them)",
            path.display()
        );
    }
    Ok(path)
}

/// Sends `method path` with `body` to sandbox `id`'s shim; returns the status and the body.
pub fn request(
    id: &str,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>)> {
    request_within(id, method, path, body, TIMEOUT)
}

/// [`request`] waiting up to `timeout` for the answer, for work that takes longer.
pub fn request_within(
    id: &str,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let sock = socket(id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async {
        tokio::time::timeout(
            timeout,
            kata_sandbox::monitor_client::request(&sock, method, path, body),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "the shim of sandbox {id} did not answer within {} s on {}",
                timeout.as_secs(),
                sock.display()
            )
        })?
        .map_err(anyhow::Error::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_escape_the_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\n"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "0123456789abcdef", "pod-1.a_b"] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
        let e = socket("no-such-sandbox-for-test").expect_err("missing");
        assert!(
            e.to_string()
                .contains("/run/vc/sbs/no-such-sandbox-for-test/shim-monitor.sock"),
            "{e}"
        );
    }
}
