use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kata_runtime::Cli::parse();
    kata_runtime::init_logging(cli.debug);
    kata_runtime::run(cli)
}
