use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Builds the guest initrd.
#[derive(Debug, Parser)]
#[command(name = "kata-guest-image", version)]
struct Args {
    /// Static kata-agent binary (becomes /init).
    #[arg(long)]
    agent: PathBuf,
    /// The guest kernel's /lib/modules/<release> directory (with modules.dep).
    #[arg(long)]
    modules_dir: PathBuf,
    /// Extra kernel modules to include (repeatable), besides the defaults.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Static busybox to include for the debug console.
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// Output file.
    #[arg(long, short)]
    output: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut modules: Vec<String> = kata_guest_image::DEFAULT_MODULES
        .iter()
        .map(|s| s.to_string())
        .collect();
    modules.extend(args.modules);
    let spec = kata_guest_image::InitrdSpec {
        agent: args.agent,
        modules_dir: args.modules_dir,
        modules,
        busybox: args.busybox,
    };
    let bytes = match kata_guest_image::build_initrd(&spec) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kata-guest-image: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let tmp = args.output.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &args.output)) {
        eprintln!(
            "kata-guest-image: failed to write {}: {e}",
            args.output.display()
        );
        return ExitCode::FAILURE;
    }
    println!("{}: {} bytes", args.output.display(), bytes.len());
    ExitCode::SUCCESS
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}
