//! `kata-runtime metrics <sandbox-id>`: prints the sandbox shim's `/metrics` (Prometheus text).

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use super::shim_client;

/// Arguments of `metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The sandbox (pod) id.
    pub sandbox_id: String,
}

/// Runs `metrics`.
pub fn run(args: MetricsArgs) -> Result<ExitCode> {
    let (status, body) =
        shim_client::request(&args.sandbox_id, hyper::Method::GET, "/metrics", Vec::new())?;
    if status != 200 {
        bail!(
            "the shim of sandbox {} answered {status}: {}",
            args.sandbox_id,
            String::from_utf8_lossy(&body).trim()
        );
    }
    std::io::stdout().write_all(&body)?;
    Ok(ExitCode::SUCCESS)
}
