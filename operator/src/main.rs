#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use ballast_operator::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match ballast_api::crd_yaml() {
            Ok(yaml) => write_stdout(&yaml),
            Err(e) => {
                eprintln!("ballast-operator: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Writes to stdout, treating a closed pipe (`| head`) as success.
fn write_stdout(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast-operator: writing to stdout failed: {e}");
            ExitCode::FAILURE
        }
    }
}
