//! Command line of `ballast-operator`.

use clap::{Parser, Subcommand};

/// ballast-operator: zero-downtime rollouts and per-request balancing for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "ballast-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the BalancedService CustomResourceDefinition as YAML
    /// (`ballast-operator crd | kubectl apply --server-side -f -`).
    Crd,
}
