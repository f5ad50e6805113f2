//! containerd-shim-kata-v2: containerd's shim v2 for Kata Containers.
//!
//! - `start`: starts the shim daemon (this binary again, in its own session) and prints the
//!   ttrpc address containerd should connect to;
//! - `delete`: cleans up after a shim that died (VM, mounts, state), printing a DeleteResponse;
//! - daemon: serves the Task API (`containerd.task.v2.Task` and `v3`) until Shutdown.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match containerd_shim_kata_v2::args::Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: {e}");
            return ExitCode::from(2);
        }
    };
    containerd_shim_kata_v2::run(args)
}
