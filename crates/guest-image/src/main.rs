use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Builds the guest initrd or rootfs disk image (or, with --trim-kernel, trims a vmlinux).
#[derive(Debug, Parser)]
#[command(name = "kata-guest-image", version)]
struct Args {
    /// Static kata-agent binary (becomes /init).
    #[arg(long, required_unless_present = "trim_kernel")]
    agent: Option<PathBuf>,
    /// The guest kernel's /lib/modules/<release> directory (with modules.dep). Leave it out for
    /// a kernel with everything built in (the project's own): no modules in the initrd.
    #[arg(long)]
    modules_dir: Option<PathBuf>,
    /// Extra kernel modules to include (repeatable), besides the defaults.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Static busybox to include for the debug console.
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// Copy a host directory tree into the image: SRC:DEST (repeatable), e.g.
    /// `--add-tree hooks:/usr/share/oci/hooks` for `guest_hook_path`.
    #[arg(long = "add-tree", value_name = "SRC:DEST")]
    trees: Vec<String>,
    /// The host's xtables-legacy-multi (Debian's iptables package), copied with its libraries
    /// and extensions, for `kata-runtime iptables`.
    #[arg(long, value_name = "XTABLES_LEGACY_MULTI")]
    iptables: Option<PathBuf>,
    /// Output file.
    #[arg(long, short, required_unless_present = "trim_kernel")]
    output: Option<PathBuf>,
    /// What to build: `initrd` (a cpio archive the kernel unpacks into RAM) or `image` (Kata's
    /// `kata-containers.img`: an ext4 disk image the guest maps as an NVDIMM with DAX, or
    /// attaches over virtio-blk).
    #[arg(long, value_enum, default_value = "initrd")]
    format: Format,
    /// Instead of building an initrd: rewrite this ELF vmlinux in place so the VMM does not read
    /// the zero bytes its segments end with (.bss and scratch space); the guest sees the same
    /// memory.
    #[arg(long, conflicts_with_all = ["agent", "modules_dir", "output", "busybox"])]
    trim_kernel: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Initrd,
    Image,
}

fn trim(path: &std::path::Path) -> ExitCode {
    let result = std::fs::read(path)
        .map_err(|e| format!("failed to read {}: {e}", path.display()))
        .and_then(|mut b| {
            let saved = kata_guest_image::kernel::trim_zero_tails(&mut b)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let tmp = path.with_extension("trim.tmp");
            std::fs::write(&tmp, &b)
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(|e| format!("failed to write {}: {e}", path.display()))?;
            Ok(saved)
        });
    match result {
        Ok(saved) => {
            println!(
                "{}: {saved} zero bytes no longer loaded from the file",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kata-guest-image: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.trim_kernel {
        return trim(path);
    }
    let (Some(agent), Some(output)) = (args.agent, args.output) else {
        eprintln!("kata-guest-image: --agent and --output are required");
        return ExitCode::from(2);
    };
    let modules_dir = args.modules_dir;
    if modules_dir.is_none() && !args.modules.is_empty() {
        eprintln!(
            "kata-guest-image: --module needs --modules-dir (the kernel's /lib/modules/<release>)"
        );
        return ExitCode::from(2);
    }
    let mut modules: Vec<String> = kata_guest_image::DEFAULT_MODULES
        .iter()
        .map(|s| s.to_string())
        .collect();
    modules.extend(args.modules);
    let mut trees = Vec::new();
    for t in &args.trees {
        match t.split_once(':') {
            Some((src, dest)) if dest.starts_with('/') && !src.is_empty() => {
                trees.push((std::path::PathBuf::from(src), dest.to_string()))
            }
            _ => {
                eprintln!(
                    "kata-guest-image: --add-tree {t:?}: expected SRC:DEST with an absolute DEST"
                );
                return ExitCode::from(2);
            }
        }
    }
    let spec = kata_guest_image::InitrdSpec {
        agent,
        modules_dir,
        modules,
        busybox: args.busybox,
        trees,
        iptables: args.iptables,
    };
    if args.format == Format::Image {
        let built = kata_guest_image::rootfs_files(&spec)
            .and_then(|files| kata_guest_image::disk::build_image(&files, &output));
        return match built {
            Ok(info) => {
                println!(
                    "{}: {} bytes (ext4 {} bytes, {} bytes of files)",
                    output.display(),
                    info.size,
                    info.fs_size,
                    info.content
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kata-guest-image: {}", chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let bytes = match kata_guest_image::build_initrd(&spec) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kata-guest-image: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let tmp = output.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &output)) {
        eprintln!(
            "kata-guest-image: failed to write {}: {e}",
            output.display()
        );
        return ExitCode::FAILURE;
    }
    println!("{}: {} bytes", output.display(), bytes.len());
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
