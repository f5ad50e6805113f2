//! `kata-runtime factory init|status|destroy`: the VM factory (`[factory]`). With
//! `enable_template = true`, `init` creates the VM template (see [`kata_sandbox::template`]),
//! `status` tells whether it is there, and `destroy` removes it (clones keep running). With
//! `vm_cache_number = N`, `init` runs the VMCache server in the foreground (see
//! [`kata_sandbox::vmcache`]), `status` lists its VMs, and `destroy` stops it (VMs it handed
//! to sandboxes keep running).

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
    /// Create the VM template (`enable_template = true`), or run the VMCache server in the
    /// foreground until Ctrl-C (`vm_cache_number > 0`).
    Init,
    /// Tell whether the VM factory is on; list the VMCache server's VMs.
    Status,
    /// Remove the VM template, or stop the VMCache server; VMs already serving sandboxes keep
    /// running.
    Destroy,
}

const NOT_ENABLED: &str = "vm factory or VMCache is not enabled";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

/// `factory` with VMCache on (`vm_cache_number > 0`).
fn run_cache(config: &Config, command: FactoryCommand) -> anyhow::Result<ExitCode> {
    let endpoint = PathBuf::from(&config.factory.vm_cache_endpoint);
    match command {
        FactoryCommand::Init => {
            let h = &config.hypervisor;
            let qemu = PathBuf::from(h.effective_path(config.hypervisor_kind));
            let accel = kata_sandbox::accel::choose(h, &qemu)?;
            let number = config.factory.vm_cache_number;
            runtime()?
                .block_on(kata_sandbox::vmcache::serve(config, accel, |ep| {
                    println!(
                        "VMCache server pid {} keeps {number} VMs ready on {} (Ctrl-C or kata-runtime factory destroy stops it)",
                        std::process::id(),
                        ep.display()
                    );
                }))
                .with_context(|| format!("VMCache server on {}", endpoint.display()))?;
        }
        FactoryCommand::Status => {
            match runtime()?.block_on(kata_sandbox::vmcache::status(&endpoint)) {
                Ok(s) => {
                    println!("VM cache server pid = {}", s.pid);
                    for vm in s.vmstatus {
                        println!(
                            "VM pid = {} Cpu = {} Memory = {}MiB",
                            vm.pid, vm.cpu, vm.memory
                        );
                    }
                }
                Err(e) => println!("VM cache server is not running: {e}"),
            }
            // The guide's last line: VM templating is what "vm factory" means there.
            println!("vm factory not enabled");
        }
        FactoryCommand::Destroy => {
            let rt = runtime()?;
            let stopped = rt
                .block_on(kata_sandbox::vmcache::quit(&endpoint))
                .map_err(anyhow::Error::msg)
                .context("failed to stop the VMCache server")?;
            if !stopped {
                // No server: what a killed one left.
                let reaped = kata_sandbox::vmcache::reap_orphans();
                if !reaped.is_empty() {
                    tracing::warn!(vms = ?reaped, "stopped the VMs a dead VMCache server left");
                }
                let _ = std::fs::remove_file(&endpoint);
            }
            println!("vm factory destroyed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `factory`.
pub fn run(config: Option<PathBuf>, args: FactoryArgs) -> anyhow::Result<ExitCode> {
    let config = super::env::effective_config(config, &[])?;
    if config.factory.vm_cache_number > 0 {
        return run_cache(&config, args.command);
    }
    let template = Template::of(&config);
    match args.command {
        FactoryCommand::Init => {
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
            if !config.factory.enable_template {
                println!("vm factory not enabled");
            } else if template.exists() {
                println!("vm factory is on");
            } else {
                println!("vm factory is off");
            }
        }
        FactoryCommand::Destroy => {
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
