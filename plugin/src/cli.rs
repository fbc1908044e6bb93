//! The command line: `kubectl ballast <command>` (kubectl runs `kubectl-ballast` from
//! the PATH with the arguments after `ballast`).

use clap::{Args, Parser, Subcommand};
use k8s_openapi::jiff::SignedDuration;
use std::time::Duration;

/// See and steer ballast rollouts.
#[derive(Parser, Debug)]
#[command(name = "kubectl-ballast", bin_name = "kubectl ballast", version)]
pub struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The live tree of a BalancedService: revisions, pods and their drain state, proxies,
    /// the last rollout and Events.
    Get(GetArgs),
    /// Every BalancedService (all namespaces unless -n is given).
    List,
    /// Pause the rollout in progress where it is.
    Pause(SteerArgs),
    /// Resume a paused or rolled-back rollout.
    Resume(SteerArgs),
    /// Abort the rollout in progress: roll back to the previous revision.
    Abort(SteerArgs),
    /// Start a new rollout of the same pod template (like `kubectl rollout restart`).
    Restart(SteerArgs),
}

/// `get`'s arguments.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The BalancedService.
    pub name: String,
    /// Keep watching: refresh in place on a terminal, print a snapshot whenever the state
    /// changes otherwise. Ctrl-C ends it.
    #[arg(short, long)]
    pub watch: bool,
    /// Time between looks (and, without --watch, between the two reads that measure each
    /// pod's share of requests; 0s skips the share).
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub interval: Duration,
    /// With --watch, stop after this many looks.
    #[arg(long)]
    pub count: Option<u64>,
}

/// The arguments of `pause`, `resume`, `abort` and `restart`.
#[derive(Args, Debug)]
pub struct SteerArgs {
    /// The BalancedService.
    pub name: String,
    /// How long to wait for the operator to act and say what it did.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub timeout: Duration,
    /// Return once the request is written, without waiting for the operator.
    #[arg(long)]
    pub no_wait: bool,
}

/// `2s`, `500ms`, `1m` (a friendly or ISO 8601 duration), or plain seconds.
fn duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string());
    }
    let signed: SignedDuration = text
        .parse()
        .map_err(|e| format!("{text:?} is no duration (try 2s, 500ms, 1m): {e}"))?;
    Duration::try_from(signed).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_writes_them() {
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(duration("soon").is_err());
        assert!(duration("-2s").is_err());
    }

    #[test]
    fn the_namespace_goes_before_or_after_the_command() {
        let before = Cli::try_parse_from(["kubectl-ballast", "-n", "shop", "get", "demo"]);
        let after = Cli::try_parse_from(["kubectl-ballast", "get", "demo", "-n", "shop", "-w"]);
        for cli in [before, after] {
            let cli = cli.expect("parses");
            assert_eq!(cli.namespace.as_deref(), Some("shop"));
            assert!(matches!(cli.command, Command::Get(ref g) if g.name == "demo"));
        }
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
