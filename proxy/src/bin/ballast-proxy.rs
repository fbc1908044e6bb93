#![forbid(unsafe_code)]

use ballast_process::{error_chain, init_logging, shutdown_signal};
use ballast_proxy::config::Settings;
use clap::Parser;
use std::process::ExitCode;

// The control plane (accept, discovery, admin, housekeeping) runs here; client
// connections are served on the worker threads `server::start` starts.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = match Settings::parse().with_file().and_then(|s| s.resolve()) {
        Ok(config) => config,
        Err(problems) => {
            for line in problems.0 {
                eprintln!("ballast-proxy: {line}");
            }
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let running = match ballast_proxy::server::start(config).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("ballast-proxy: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let trigger = running.shutdown_trigger();
    let signal = shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        trigger.notify_one();
    });
    running.stopped().await;
    ExitCode::SUCCESS
}
