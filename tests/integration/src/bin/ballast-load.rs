#![forbid(unsafe_code)]
//! A small fixed-rate HTTP load generator for the real-cluster e2e: it runs in a pod
//! next to the service, sends GETs from keep-alive connections at a fixed total rate
//! for a bounded time, and prints one JSON summary line: requests sent, failed (5xx or
//! no response) and served per pod (`x-served-by`). Like a gateway it opens a new
//! connection when the server closes one.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};

/// Fixed-rate GETs against one URL; prints a JSON summary.
#[derive(Debug, Parser)]
#[command(name = "ballast-load", version)]
struct Args {
    /// URL to GET, e.g. http://demo.default.svc/
    #[arg(long)]
    target: hyper::Uri,
    /// Requests per second, in all.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Concurrent keep-alive clients sharing the rate.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Every Nth request asks the app for `delay_ms=long-ms` (0: never).
    #[arg(long, default_value_t = 0)]
    long_every: u64,
    /// Delay of the long requests, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    long_ms: u64,
    /// Limit for one request.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

#[derive(Default, serde::Serialize)]
struct Summary {
    sent: u64,
    ok: u64,
    failed: u64,
    by_status: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    served_by: BTreeMap<String, u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.clients == 0 || args.rate == 0 {
        eprintln!("ballast-load: --rate and --clients must be at least 1");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ballast-load: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let summary = runtime.block_on(run(&args));
    match serde_json::to_string(&summary) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ballast-load: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Summary {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let summary = Arc::new(Mutex::new(Summary::default()));
    let end = Instant::now() + Duration::from_secs(args.duration_secs);
    let interval = Duration::from_secs_f64(f64::from(args.clients) / f64::from(args.rate));
    let tasks = (0..args.clients).map(|i| {
        let (client, summary) = (client.clone(), summary.clone());
        let target = args.target.clone();
        let (long_every, long_ms) = (args.long_every, args.long_ms);
        let limit = Duration::from_secs(args.timeout_secs);
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut n = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                n += 1;
                let uri = if long_every > 0
                    && (n * u64::from(args.clients) + u64::from(i)).is_multiple_of(long_every)
                {
                    with_query(&target, &format!("delay_ms={long_ms}"))
                } else {
                    target.clone()
                };
                let outcome = tokio::time::timeout(limit, get(&client, uri)).await;
                let mut s = summary.lock().unwrap_or_else(PoisonError::into_inner);
                s.sent += 1;
                match outcome {
                    Ok(Ok((status, pod))) => {
                        *s.by_status.entry(status).or_default() += 1;
                        if let Some(pod) = pod {
                            *s.served_by.entry(pod).or_default() += 1;
                        }
                        if status >= 500 {
                            s.failed += 1;
                        } else {
                            s.ok += 1;
                        }
                    }
                    Ok(Err(e)) => {
                        s.failed += 1;
                        *s.errors.entry(e).or_default() += 1;
                    }
                    Err(_) => {
                        s.failed += 1;
                        *s.errors.entry("timed out".to_owned()).or_default() += 1;
                    }
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
    std::mem::take(&mut *summary.lock().unwrap_or_else(PoisonError::into_inner))
}

fn with_query(uri: &hyper::Uri, query: &str) -> hyper::Uri {
    let text = uri.to_string();
    let joined = if text.contains('?') {
        format!("{text}&{query}")
    } else {
        format!("{text}?{query}")
    };
    joined.parse().unwrap_or_else(|_| uri.clone())
}

async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    uri: hyper::Uri,
) -> Result<(u16, Option<String>), String> {
    let response = client.get(uri).await.map_err(|e| error_text(&e))?;
    let status = response.status().as_u16();
    let pod = response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| error_text(&e))?;
    Ok((status, pod))
}

fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
