//! Each command from a client to its output: the reads and writes of `read` and
//! `steer`, the text of `render` and `list`. The binary only builds the client and
//! picks the command; the tests run these against a stand-in API server.

use ballast_api::BalancedService;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use std::io::Write;
use std::time::Duration;

pub use ballast_process::error_chain;

use crate::cli::{GetArgs, SteerArgs};
use crate::list;
use crate::read::{self, ReadError};
use crate::render::{self, Layout};
use crate::snapshot::Snapshot;
use crate::steer::{self, Operation, Plan, Refusal, SteerError};
use crate::tree::Tree;

/// How often a waiting command reads the BalancedService back.
pub const POLL: Duration = Duration::from_millis(500);

/// Why a command failed, and the exit code it ends with.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The operation does not apply as things are.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Writing or waiting failed.
    #[error(transparent)]
    Steer(#[from] SteerError),
    /// Listing BalancedServices failed.
    #[error("listing BalancedServices failed")]
    List(#[source] kube::Error),
    /// Writing the output failed.
    #[error("writing the output failed")]
    Output(#[from] std::io::Error),
}

impl CommandError {
    /// 2 when the operator did not act in time (the request stands), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Steer(SteerError::NotActed { .. }) => 2,
            _ => 1,
        }
    }
}

/// Where the tree goes.
#[derive(Clone, Copy, Debug)]
pub enum Screen {
    /// A terminal this many columns wide: redraw in place, cut long lines.
    Terminal(usize),
    /// A file or pipe: plain text, whole lines, a new snapshot only on a change.
    Plain,
}

/// `get NAME [--watch]`.
pub async fn get(
    client: &Client,
    namespace: &str,
    args: &GetArgs,
    screen: Screen,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let mut before: Option<Snapshot> = None;
    if !args.watch && !args.interval.is_zero() {
        // Two reads `interval` apart: the share of requests between them.
        before = Some(read::snapshot(client, namespace, &args.name).await?);
        tokio::time::sleep(args.interval).await;
    }
    let mut shown: Option<Tree> = None;
    let mut looks = 0u64;
    loop {
        let now = match read::snapshot(client, namespace, &args.name).await {
            Ok(now) => Some(now),
            Err(e @ ReadError::NotFound { .. }) => return Err(e.into()),
            Err(e) if !args.watch => return Err(e.into()),
            Err(e) => {
                // A watch outlives a hiccup of the API server: say so and look again.
                writeln!(out, "{}: {}", Timestamp::now(), error_chain(&e))?;
                None
            }
        };
        if let Some(now) = now {
            let tree = Tree::build(&now, before.as_ref());
            match screen {
                Screen::Terminal(width) => {
                    let text = render::tree(&tree, Layout { width: Some(width) });
                    // Home, clear, draw: the tree refreshes in place.
                    write!(out, "\x1b[H\x1b[2J{text}")?;
                }
                Screen::Plain => {
                    let key = tree.state_key();
                    if shown.as_ref() != Some(&key) {
                        if args.watch {
                            writeln!(out, "--- {}", tree.at)?;
                        }
                        write!(out, "{}", render::tree(&tree, Layout { width: None }))?;
                        shown = Some(key);
                    }
                }
            }
            out.flush()?;
            before = Some(now);
        }
        looks += 1;
        if !args.watch || args.count.is_some_and(|c| looks >= c) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `list`: in `namespace`, or in all namespaces.
pub async fn list(
    client: &Client,
    namespace: Option<&str>,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let api: Api<BalancedService> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let services = api
        .list(&ListParams::default())
        .await
        .map_err(CommandError::List)?
        .items;
    if services.is_empty() {
        match namespace {
            Some(ns) => writeln!(out, "No BalancedServices in namespace {ns}.")?,
            None => writeln!(out, "No BalancedServices in any namespace.")?,
        }
        return Ok(());
    }
    write!(
        out,
        "{}",
        list::render(&list::rows(&services, Timestamp::now()))
    )?;
    Ok(())
}

/// `pause`, `resume`, `abort`, `restart`: the write, then (unless `--no-wait`) the
/// operator's answer.
pub async fn steer(
    client: &Client,
    namespace: &str,
    operation: Operation,
    args: &SteerArgs,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let api: Api<BalancedService> = Api::namespaced(client.clone(), namespace);
    let bs = api
        .get_opt(&args.name)
        .await
        .map_err(|source| ReadError::Read {
            what: format!("BalancedService {namespace}/{}", args.name),
            source,
        })?
        .ok_or_else(|| ReadError::NotFound {
            namespace: namespace.to_owned(),
            name: args.name.clone(),
        })?;
    let now = Timestamp::now();
    let plan = steer::plan(operation, &bs, now)?;
    let name = bs.name_any();
    if let Plan::AlreadyDone(what) = &plan {
        writeln!(out, "{name}: {what}")?;
        return Ok(());
    }
    let earlier = events(client, namespace, &name).await?;
    steer::write(client, &bs, &plan, now).await?;
    if args.no_wait {
        writeln!(
            out,
            "{name}: {} written; the operator acts on it when it next reconciles",
            steer::written(&plan)
        )?;
        return Ok(());
    }
    let after = steer::wait_for_operator(client, &bs, &plan, args.timeout, POLL).await?;
    let later = events(client, namespace, &name).await?;
    let fresh = steer::fresh(&earlier, &later);
    writeln!(out, "{name}: {}", steer::outcome(&plan, &after, &fresh))?;
    Ok(())
}

/// The Events of BalancedService `name`.
async fn events(client: &Client, namespace: &str, name: &str) -> Result<Vec<Event>, CommandError> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().fields(&read::event_fields(name, None)))
        .await
        .map(|l| l.items)
        .map_err(|source| {
            SteerError::Read {
                what: format!("the Events of {namespace}/{name}"),
                source,
            }
            .into()
        })
}
