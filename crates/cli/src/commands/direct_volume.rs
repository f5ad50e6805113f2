//! `kata-runtime direct-volume add|remove|stats|resize`, as Kata's: record that the volume
//! mounted at a host path is a block device (so containers get the device, hot-plugged, instead
//! of a shared directory), forget it, read its usage in the guest, grow it online.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kata_sandbox::direct_volume::{Store, VolumeError};

use super::shim_client;

/// Arguments of `direct-volume`.
#[derive(Debug, Args)]
pub struct DirectVolumeArgs {
    /// What to do.
    #[command(subcommand)]
    pub op: Op,
}

/// The operations.
#[derive(Debug, Subcommand)]
pub enum Op {
    /// Record a direct volume: its mountInfo.json (`volume-type`, `device`, `fstype`,
    /// `metadata`, `options`).
    Add {
        /// The volume's host path (the bind mount source containers will name).
        #[arg(long)]
        volume_path: String,
        /// The mount info, JSON, for example
        /// '{"volume-type":"block","device":"/dev/sdb","fstype":"ext4","options":["ro"]}'.
        #[arg(long)]
        mount_info: String,
    },
    /// Forget a direct volume.
    Remove {
        /// The volume's host path.
        #[arg(long)]
        volume_path: String,
    },
    /// Print the volume's usage in the guest (JSON: bytes and inodes).
    Stats {
        /// The volume's host path.
        #[arg(long)]
        volume_path: String,
    },
    /// Grow the volume (after its host device has grown) and its filesystem, online.
    Resize {
        /// The volume's host path.
        #[arg(long)]
        volume_path: String,
        /// The new size in bytes.
        #[arg(long)]
        size: u64,
    },
}

/// The sandbox using the volume and the volume's device.
fn sandbox_and_device(store: &Store, volume_path: &str) -> Result<(String, String)> {
    let info = store.require(volume_path)?;
    // A sandbox that is running, else Kata's rule (the first recorded) for the error.
    let recorded = store.sandboxes_of(volume_path)?;
    let sandbox = recorded
        .iter()
        .find(|s| shim_client::socket(s).is_ok())
        .or(recorded.first())
        .cloned()
        .ok_or_else(|| VolumeError::NoSandbox(volume_path.to_string()))?;
    shim_client::socket(&sandbox).with_context(|| {
        format!("volume {volume_path} was used by sandbox {sandbox}, which is not running")
    })?;
    Ok((sandbox, info.device))
}

/// Runs `direct-volume`.
pub fn run(args: DirectVolumeArgs) -> Result<ExitCode> {
    run_in(&Store::default(), args)
}

/// Runs `direct-volume` against `store`.
pub fn run_in(store: &Store, args: DirectVolumeArgs) -> Result<ExitCode> {
    match args.op {
        Op::Add {
            volume_path,
            mount_info,
        } => {
            let ignored = store.add(&volume_path, mount_info.as_bytes())?;
            if !ignored.is_empty() {
                eprintln!(
                    "kata-runtime: warning: mount info keys ignored: {} (known: volume-type, device, fstype, metadata, options)",
                    ignored.join(", ")
                );
            }
        }
        Op::Remove { volume_path } => store.remove(&volume_path)?,
        Op::Stats { volume_path } => {
            let (sandbox, device) = sandbox_and_device(store, &volume_path)?;
            let path = format!(
                "/direct-volume/stats?path={}",
                kata_sandbox::monitor_client::percent_encode(&device)
            );
            let (status, body) =
                shim_client::request(&sandbox, hyper::Method::GET, &path, Vec::new())?;
            if status != 200 {
                bail!(
                    "sandbox {sandbox}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            let mut out = std::io::stdout();
            out.write_all(&body)?;
            out.write_all(b"\n")?;
        }
        Op::Resize { volume_path, size } => {
            if size == 0 {
                bail!("--size must be the new size in bytes, more than 0");
            }
            let (sandbox, device) = sandbox_and_device(store, &volume_path)?;
            let body = serde_json::json!({ "VolumePath": device, "Size": size }).to_string();
            // The answer comes when the guest's filesystem has grown (or could not).
            let (status, reply) = shim_client::request_within(
                &sandbox,
                hyper::Method::POST,
                "/direct-volume/resize",
                body.into_bytes(),
                shim_client::RESIZE_TIMEOUT,
            )?;
            if status != 200 {
                bail!(
                    "sandbox {sandbox}: {}",
                    String::from_utf8_lossy(&reply).trim()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_an_unknown_or_unused_volume_are_clear_errors() {
        let d = tempfile::tempdir().expect("tmp");
        let store = Store::new(d.path());
        let e = run_in(
            &store,
            DirectVolumeArgs {
                op: Op::Stats {
                    volume_path: "/v/unknown".into(),
                },
            },
        )
        .expect_err("unknown");
        assert!(e.to_string().contains("is not a direct volume"), "{e}");
        store
            .add("/v/a", br#"{"device":"/dev/loop9","fstype":"ext4"}"#)
            .expect("add");
        let e = run_in(
            &store,
            DirectVolumeArgs {
                op: Op::Resize {
                    volume_path: "/v/a".into(),
                    size: 1 << 30,
                },
            },
        )
        .expect_err("unused");
        assert!(e.to_string().contains("not used by any sandbox"), "{e}");
        store
            .record_sandbox("/v/a", "gone-sandbox")
            .expect("record");
        let e = run_in(
            &store,
            DirectVolumeArgs {
                op: Op::Stats {
                    volume_path: "/v/a".into(),
                },
            },
        )
        .expect_err("gone");
        assert!(
            format!("{e:#}").contains("sandbox gone-sandbox, which is not running"),
            "{e:#}"
        );
    }
}
