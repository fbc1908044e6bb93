#![forbid(unsafe_code)]
//! preStop helper: waits until no proxy replica has requests or connections in flight
//! to this pod, bounded by --timeout. Always exits 0 once started, so the pod stops.

use ballast_proxy::config::parse_duration;
use ballast_proxy::drain::{DrainConfig, drain, resolve};
use clap::Parser;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Drain this pod from every ballast proxy replica before it stops.
#[derive(Debug, Parser)]
#[command(name = "ballast-drain", version)]
struct Args {
    /// The proxies' admin Service, `<name>-proxy-admin.<namespace>.svc:9901`; every
    /// address it resolves to is a replica. Re-resolved each round.
    #[arg(long, env = "BALLAST_DRAIN_PROXIES")]
    proxies: String,
    /// Stop waiting after this long (the pod stops anyway).
    #[arg(long, env = "BALLAST_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Pause between rounds.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Source address of the calls (the pod's IP; the proxies identify the pod by it).
    #[arg(long)]
    source_address: Option<IpAddr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = DrainConfig {
        timeout: args.timeout,
        poll_interval: args.poll_interval,
        source: args.source_address,
        call_timeout: Duration::from_secs(1),
    };
    let target = args.proxies.clone();
    let outcome = drain(&config, || resolve(&target)).await;
    // kubelet shows a failing hook's output in Events; keep it to one line.
    eprintln!("ballast-drain: {outcome}");
    ExitCode::SUCCESS
}
