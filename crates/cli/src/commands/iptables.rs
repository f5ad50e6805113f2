//! `kata-runtime iptables get|set --sandbox-id ID [--v6] [FILE]`: the packet filter inside a
//! sandbox's VM (the pod's network), through the shim's monitor socket (`/iptables`,
//! `/ip6tables`), as Kata's.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::shim_client;

/// Largest rules file accepted (the shim takes at most this much).
pub const MAX_RULES: usize = 4 << 20;

/// Arguments of `iptables`.
#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// What to do.
    #[command(subcommand)]
    pub op: Op,
}

/// `get` or `set`.
#[derive(Debug, Subcommand)]
pub enum Op {
    /// Print the guest's rules (`iptables-save` output).
    Get {
        /// The sandbox (pod) id.
        #[arg(long)]
        sandbox_id: String,
        /// IPv6 (`ip6tables`).
        #[arg(long)]
        v6: bool,
    },
    /// Replace the guest's rules with an `iptables-save` file (`-` or none: stdin); a file the
    /// restore refuses changes nothing.
    Set {
        /// The sandbox (pod) id.
        #[arg(long)]
        sandbox_id: String,
        /// IPv6 (`ip6tables`).
        #[arg(long)]
        v6: bool,
        /// The rules file.
        file: Option<PathBuf>,
    },
}

fn path(v6: bool) -> &'static str {
    if v6 {
        "/ip6tables"
    } else {
        "/iptables"
    }
}

/// Runs `iptables`.
pub fn run(args: IptablesArgs) -> Result<ExitCode> {
    match args.op {
        Op::Get { sandbox_id, v6 } => {
            let (status, body) =
                shim_client::request(&sandbox_id, hyper::Method::GET, path(v6), Vec::new())?;
            if status != 200 {
                bail!(
                    "the shim of sandbox {sandbox_id} answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            std::io::stdout().write_all(&body)?;
        }
        Op::Set {
            sandbox_id,
            v6,
            file,
        } => {
            let mut rules = Vec::new();
            match file.as_deref() {
                None => std::io::stdin().read_to_end(&mut rules).map(|_| ()),
                Some(p) if p.as_os_str() == "-" => {
                    std::io::stdin().read_to_end(&mut rules).map(|_| ())
                }
                Some(p) => std::fs::read(p).map(|b| rules = b),
            }
            .with_context(|| {
                format!(
                    "read the rules from {}",
                    file.as_deref()
                        .map_or("stdin".into(), |p| p.display().to_string())
                )
            })?;
            if rules.len() > MAX_RULES {
                bail!(
                    "the rules file is {} bytes, more than {MAX_RULES}",
                    rules.len()
                );
            }
            let (status, body) =
                shim_client::request(&sandbox_id, hyper::Method::PUT, path(v6), rules)?;
            if status != 200 {
                bail!(
                    "the shim of sandbox {sandbox_id} answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            std::io::stdout().write_all(&body)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
