//! Command line of `ballast-operator`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The image with `ballast-proxy` and `ballast-drain` used unless told otherwise.
pub const DEFAULT_PROXY_IMAGE: &str =
    concat!("ghcr.io/ballast-dev/ballast:", env!("CARGO_PKG_VERSION"));

/// Where `config/default` installs the operator.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "ballast-system";

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
    /// Print every object the operator would create for the BalancedServices in a file,
    /// as multi-document YAML, without a cluster (like `helm template`).
    Render {
        /// YAML file with one or more BalancedServices (`-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Proxy image to render.
        #[arg(long, env = "BALLAST_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
        proxy_image: String,
        /// Largest spec.replicas accepted.
        #[arg(long, env = "BALLAST_MAX_REPLICAS", default_value_t = 1000)]
        max_replicas: i32,
        /// The operator's namespace, admitted to the proxies' admin port by their
        /// NetworkPolicy.
        #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_OPERATOR_NAMESPACE)]
        operator_namespace: String,
    },
    /// Run the controller.
    Run(RunArgs),
}

/// Flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "BALLAST_NAMESPACE")]
    pub namespace: Option<String>,
    /// Take a coordination.k8s.io Lease so that only one replica reconciles.
    #[arg(long, env = "BALLAST_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Identity in the Lease and in Events (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "BALLAST_ADMIN_LISTEN", default_value = "[::]:8080")]
    pub admin_listen: SocketAddr,
    /// Image with ballast-proxy and ballast-drain.
    #[arg(long, env = "BALLAST_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// Largest spec.replicas accepted.
    #[arg(long, env = "BALLAST_MAX_REPLICAS", default_value_t = 1000)]
    pub max_replicas: i32,
    /// Log format: text or json.
    #[arg(long, env = "BALLAST_LOG_FORMAT", default_value = "text")]
    pub log_format: ballast_api::settings::LogFormat,
    /// The operator's own namespace, admitted to the proxies' admin port by their
    /// NetworkPolicy (the operator reads the proxies' `/endpoints`).
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_OPERATOR_NAMESPACE)]
    pub operator_namespace: String,
}
