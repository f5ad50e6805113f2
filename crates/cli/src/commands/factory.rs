//! `kata-runtime factory init|status|destroy`: the VM factory (`[factory]`). With
//! `enable_template = true`, `init` creates the VM template (see [`kata_sandbox::template`]),
//! `status` tells whether it is there, and `destroy` removes it (clones keep running).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kata_config::Config;
use kata_sandbox::template::Template;

/// `factory` arguments.
#[derive(Debug, Args)]
pub struct FactoryArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FactoryCommand,
}

/// `factory` subcommands.
#[derive(Debug, Subcommand)]
pub enum FactoryCommand {
    /// Create the VM template (`enable_template = true`).
    Init,
    /// Tell whether the VM factory is on.
    Status,
    /// Remove the VM template; VMs cloned from it keep running.
    Destroy,
}

const NOT_ENABLED: &str = "vm factory or VMCache is not enabled";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

/// VMCache (`vm_cache_number > 0`) is not built: said, never ignored.
fn cache_unsupported(config: &Config) -> anyhow::Result<()> {
    if config.factory.vm_cache_number > 0 {
        anyhow::bail!(
            "[factory].vm_cache_number = {}: VMCache is not supported by this runtime yet; set it to 0 (VM templating, enable_template = true, is)",
            config.factory.vm_cache_number
        );
    }
    Ok(())
}

/// Runs `factory`.
pub fn run(config: Option<PathBuf>, args: FactoryArgs) -> anyhow::Result<ExitCode> {
    let config = super::env::effective_config(config, &[])?;
    let template = Template::of(&config);
    match args.command {
        FactoryCommand::Init => {
            cache_unsupported(&config)?;
            if !config.factory.enable_template {
                println!("{NOT_ENABLED}");
                return Ok(ExitCode::SUCCESS);
            }
            let h = &config.hypervisor;
            let qemu = PathBuf::from(h.effective_path(config.hypervisor_kind));
            let accel = kata_sandbox::accel::choose(h, &qemu)?;
            let created = runtime()?
                .block_on(template.ensure(&config, accel))
                .with_context(|| {
                    format!(
                        "failed to create the VM template in {}",
                        template.dir.display()
                    )
                })?;
            if let Some(c) = created {
                tracing::info!(ms = c.ms, tmpfs_mib = c.tmpfs_mib, "VM template created");
            }
            println!("vm factory initialized");
        }
        FactoryCommand::Status => {
            cache_unsupported(&config)?;
            if !config.factory.enable_template {
                println!("vm factory is not enabled");
            } else if template.exists() {
                println!("vm factory is on");
            } else {
                println!("vm factory is off");
            }
        }
        FactoryCommand::Destroy => {
            cache_unsupported(&config)?;
            if config.factory.enable_template {
                runtime()?.block_on(template.destroy()).with_context(|| {
                    format!(
                        "failed to remove the VM template {}",
                        template.dir.display()
                    )
                })?;
            }
            println!("vm factory destroyed");
        }
    }
    Ok(ExitCode::SUCCESS)
}
