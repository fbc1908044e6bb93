#![forbid(unsafe_code)]
//! preStop helper: waits until no proxy replica has requests or connections in flight
//! to this pod, bounded by --timeout, then runs the user's own preStop (if any). Always
//! exits 0 once started, so the pod stops.
//!
//! `ballast-drain install DIR` copies this binary into DIR (an init container does it,
//! so the helper runs in any app image, distroless included).

use ballast_proxy::config::parse_duration;
use ballast_proxy::drain::{DrainConfig, cluster_domain, drain, qualify, resolve};
use clap::Parser;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Drain this pod from every ballast proxy replica before it stops.
#[derive(Debug, Parser)]
#[command(
    name = "ballast-drain",
    version,
    override_usage = "ballast-drain [OPTIONS] --proxies <PROXIES> [-- <THEN>...]\n       ballast-drain install DIR",
    after_help = "ballast-drain install DIR: copy this binary into DIR"
)]
struct Args {
    /// The proxies' admin Service, `<name>-proxy-admin.<namespace>.svc:9901` (or several
    /// `host:port`s separated by commas); every address it resolves to is a replica.
    /// Resolved again about once a second. A `.svc` name is made absolute with the
    /// cluster domain; a name that does not exist means there are no proxies.
    #[arg(long, env = "BALLAST_DRAIN_PROXIES")]
    proxies: String,
    /// The cluster's DNS domain, for making `.svc` names absolute. Default: read from
    /// the pod's /etc/resolv.conf (kubelet's `svc.<domain>` search entry); without one,
    /// names are resolved as given.
    #[arg(long, env = "BALLAST_DRAIN_CLUSTER_DOMAIN")]
    cluster_domain: Option<String>,
    /// Stop waiting after this long (the pod stops anyway).
    #[arg(long, env = "BALLAST_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Pause between rounds.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Source address of the calls (the pod's IP; the proxies identify the pod by it).
    #[arg(long)]
    source_address: Option<IpAddr>,
    /// After draining, sleep this long (a user's `preStop: sleep` hook).
    #[arg(long, value_parser = parse_duration)]
    then_sleep: Option<Duration>,
    /// After draining, run this command (a user's `preStop: exec` hook).
    #[arg(last = true)]
    then: Vec<String>,
}

fn main() -> ExitCode {
    let mut raw = std::env::args();
    if raw.nth(1).as_deref() == Some("install") {
        return match raw.next() {
            Some(dir) => install(Path::new(&dir)),
            None => {
                eprintln!("ballast-drain: usage: ballast-drain install DIR");
                ExitCode::from(2)
            }
        };
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ballast-drain: cannot start: {e}");
            return ExitCode::SUCCESS;
        }
    };
    let config = DrainConfig {
        timeout: args.timeout,
        poll_interval: args.poll_interval,
        resolve_interval: Duration::from_secs(1),
        source: args.source_address,
        call_timeout: Duration::from_secs(1),
    };
    let domain = args.cluster_domain.clone().or_else(|| {
        std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|text| cluster_domain(&text))
    });
    let proxies = qualify(&args.proxies, domain.as_deref());
    let outcome = runtime.block_on(drain(
        &config,
        || resolve(&proxies),
        |line| eprintln!("ballast-drain: {line}"),
    ));
    // kubelet shows a failing hook's output in Events; the outcome is one line.
    eprintln!("ballast-drain: {outcome}");
    if let Some(pause) = args.then_sleep {
        std::thread::sleep(pause);
    }
    if let Some((program, rest)) = args.then.split_first() {
        match std::process::Command::new(program).args(rest).status() {
            Ok(status) if !status.success() => {
                eprintln!("ballast-drain: the pod's own preStop ({program}) ended with {status}")
            }
            Ok(_) => {}
            Err(e) => eprintln!("ballast-drain: cannot run the pod's own preStop ({program}): {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// Copies the running executable to `dir/ballast-drain`, executable by everyone.
fn install(dir: &Path) -> ExitCode {
    let target = dir.join("ballast-drain");
    let copied = std::env::current_exe()
        .and_then(|me| std::fs::copy(me, &target))
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        });
    match copied {
        Ok(()) => {
            eprintln!("ballast-drain: installed {}", target.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ballast-drain: cannot install into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
