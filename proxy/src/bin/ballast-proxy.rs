#![forbid(unsafe_code)]

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
    init_logging(config.log_format == ballast_api::settings::LogFormat::Json);
    let running = match ballast_proxy::server::start(config).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("ballast-proxy: {e}: {}", e.source_text());
            return ExitCode::FAILURE;
        }
    };
    let trigger = running.shutdown_trigger();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.notify_one();
    });
    running.stopped().await;
    ExitCode::SUCCESS
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

trait SourceText {
    fn source_text(&self) -> String;
}

impl<E: std::error::Error> SourceText for E {
    fn source_text(&self) -> String {
        self.source().map(ToString::to_string).unwrap_or_default()
    }
}
