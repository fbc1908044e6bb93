//! `kubectl-ballast`: put it on the PATH and run `kubectl ballast ...`.
#![forbid(unsafe_code)]

use clap::Parser;
use kube::Client;
use kube::config::{Config, KubeConfigOptions};
use std::io::IsTerminal;
use std::process::ExitCode;

use kubectl_ballast::cli::{Cli, Command};
use kubectl_ballast::commands::{self, CommandError, Screen, error_chain};
use kubectl_ballast::steer::Operation;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match client(cli.context.as_deref()).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: no cluster to talk to: {e}");
            return ExitCode::FAILURE;
        }
    };
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let stdout = std::io::stdout();
    let screen = if stdout.is_terminal() {
        Screen::Terminal(terminal_size::terminal_size().map_or(120, |(w, _)| usize::from(w.0)))
    } else {
        Screen::Plain
    };
    let mut out = stdout.lock();
    let result: Result<(), CommandError> = match &cli.command {
        Command::Get(args) => commands::get(&client, &namespace, args, screen, &mut out).await,
        Command::List => commands::list(&client, cli.namespace.as_deref(), &mut out).await,
        Command::Pause(args) => steer(&client, &namespace, Operation::Pause, args, &mut out).await,
        Command::Resume(args) => {
            steer(&client, &namespace, Operation::Resume, args, &mut out).await
        }
        Command::Abort(args) => steer(&client, &namespace, Operation::Abort, args, &mut out).await,
        Command::Restart(args) => {
            steer(&client, &namespace, Operation::Restart, args, &mut out).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn steer(
    client: &Client,
    namespace: &str,
    operation: Operation,
    args: &kubectl_ballast::cli::SteerArgs,
    out: &mut impl std::io::Write,
) -> Result<(), CommandError> {
    commands::steer(client, namespace, operation, args, out).await
}

/// A client for the kubeconfig's current context (or `context`), or in-cluster.
async fn client(context: Option<&str>) -> Result<Client, Box<dyn std::error::Error>> {
    let config = match context {
        Some(context) => {
            let options = KubeConfigOptions {
                context: Some(context.to_owned()),
                ..KubeConfigOptions::default()
            };
            Config::from_kubeconfig(&options).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}
