#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use ballast_operator::api_requests::CountRequests;
use ballast_operator::build::BuildContext;
use ballast_operator::cli::{Cli, Command, RunArgs};
use ballast_operator::controller::{self, Caches, Context};
use ballast_operator::leader::{Election, Timing};
use ballast_operator::metrics::Metrics;
use ballast_operator::render;
use ballast_operator::validate::Limits;
use ballast_process::{error_chain, init_logging, shutdown_signal};
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
        Command::Render {
            file,
            proxy_image,
            max_replicas,
            operator_namespace,
        } => {
            let input = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            };
            let input = match input {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("ballast-operator: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            match render::render(
                &input,
                &BuildContext {
                    proxy_image,
                    operator_namespace,
                },
                &Limits { max_replicas },
            ) {
                Ok(yaml) => write_stdout(&yaml),
                Err(e) => {
                    eprintln!("ballast-operator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(run(args)),
            Err(e) => {
                eprintln!("ballast-operator: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(args: RunArgs) -> ExitCode {
    init_logging(args.log_format);
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(ballast_operator::admin::serve(
        args.admin_listen,
        metrics.clone(),
        ready.clone(),
    ));
    // Every request is counted (ballast_operator_api_requests_total): the API load per
    // BalancedService is measured, not guessed.
    let client = match kube::Config::infer()
        .await
        .map_err(|e| error_chain(&e))
        .and_then(|config| {
            kube::client::ClientBuilder::try_from(config).map_err(|e| error_chain(&e))
        }) {
        Ok(builder) => builder.with_layer(&CountRequests(metrics.clone())).build(),
        Err(e) => {
            tracing::error!(error = %e, "cannot configure the Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "ballast-operator".to_owned());
    ready.store(true, Relaxed);
    let namespace = args.namespace.clone();
    // Each term as leader starts from a fresh context: caches, rollout memory and the
    // objects known to be ours are rebuilt from the API server, never carried over.
    let work = || {
        let (caches, writers) = Caches::new();
        let ctx = Arc::new(Context::new(
            client.clone(),
            BuildContext {
                proxy_image: args.proxy_image.clone(),
                operator_namespace: args.operator_namespace.clone(),
            },
            Limits {
                max_replicas: args.max_replicas,
            },
            metrics.clone(),
            identity.clone(),
            caches,
        ));
        let namespace = namespace.clone();
        async move { controller::run(ctx, writers, namespace.as_deref()).await }
    };
    let signal = shutdown_signal();
    let stopped = async {
        signal.await;
        tracing::info!("signal received: stopping");
    };
    let election = if args.leader_elect {
        let lease_ns = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        match Election::new(client.clone(), &lease_ns, &identity, Timing::default()) {
            Ok(election) => Some(election),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "leader election cannot start");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    tokio::select! {
        () = async {
            match &election {
                // Releases the lease on the signal, so a standby takes over at once.
                Some(election) => election.run(work, stopped).await,
                None => tokio::select! {
                    () = work() => tracing::error!("controller stopped"),
                    () = stopped => {}
                },
            }
        } => {}
        admin = admin => {
            tracing::error!(result = ?admin.map(|r| r.map_err(|e| e.to_string())), "admin listener stopped");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
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
