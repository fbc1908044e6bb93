#![forbid(unsafe_code)]
//! `ballast-demo`: ballast's main job on a laptop, no cluster. It runs the rollout
//! scenario (see `ballast_integration::scenario`) three ways at once on the local
//! cluster stand-in — ballast, Kubernetes defaults, and `preStop: sleep` — with a live
//! view, then prints the side-by-side table. Pods are local processes on loopback
//! addresses; nothing here is Kubernetes.

use ballast_integration::scenario::{
    self, Live, LiveHandle, ScenarioConfig, ScenarioReport, Variant, bin_dir_of_current_exe,
    scratch_dir,
};
use clap::Parser;
use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Rollout under load: ballast vs Kubernetes defaults vs `preStop: sleep`.
#[derive(Debug, Parser)]
#[command(name = "ballast-demo", version)]
struct Args {
    /// App pods.
    #[arg(long, default_value_t = 8)]
    pods: u32,
    /// Short requests per second (keep-alive), per variant.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Keep-alive connections carrying them.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Seconds of steady load before and after the rollout (balance is measured there).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seed of kube-proxy's random picks and of the long requests.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// EndpointSlice propagation delay, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    propagation_ms: u64,
    /// The `preStop: sleep` variant's sleep, in seconds.
    #[arg(long, default_value_t = 30)]
    sleep: u64,
    /// Skip the rollout of the proxy replicas.
    #[arg(long)]
    no_proxy_rollout: bool,
    /// Plain line output even on a terminal.
    #[arg(long)]
    plain: bool,
    /// Also write the results as JSON lines to this file (for bench/rollout.sh).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.pods == 0 || args.pods > 200 || args.rate == 0 || args.clients == 0 {
        eprintln!("ballast-demo: --pods must be 1..=200, --rate and --clients at least 1");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ballast-demo: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(demo(&args));
    // Ends every pod, proxy and client still running (their processes are killed).
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn demo(args: &Args) -> ExitCode {
    let variants = [
        (
            Variant::Ballast,
            "drain gate + readiness gate + per-request balancing",
        ),
        (
            Variant::KubernetesDefaults,
            "plain Deployment, kube-proxy (one pick per connection), no preStop",
        ),
        (
            Variant::SleepInsteadOfGate(args.sleep),
            "ballast's proxies, but the usual preStop sleep instead of the drain gate",
        ),
    ];
    let bin_dir = bin_dir_of_current_exe();
    let runs: Vec<(Variant, &str, ScenarioConfig, LiveHandle)> = variants
        .iter()
        .enumerate()
        .map(|(i, (variant, about))| {
            let mut cfg = ScenarioConfig::new(
                bin_dir.clone(),
                scratch_dir(&format!("demo-{i}")),
                21 + i as u8,
            );
            cfg.pods = args.pods;
            cfg.rate = args.rate;
            cfg.clients = args.clients;
            cfg.seed = args.seed;
            cfg.steady = Duration::from_secs(args.duration.max(2));
            cfg.propagation = Duration::from_millis(args.propagation_ms);
            cfg.proxy_rollout = !args.no_proxy_rollout;
            (*variant, *about, cfg, Arc::new(Mutex::new(Live::default())))
        })
        .collect();

    println!(
        "ballast demo: {} pods (they exit at once on SIGTERM) under {} req/s on {} keep-alive\n\
         connections, long requests (up to 5 s) and WebSockets; a rollout to a new revision,\n\
         then of the proxies. Three variants at once on the local cluster stand-in\n\
         (processes on 127.21-23.*.*), not Kubernetes.",
        args.pods, args.rate, args.clients
    );
    let interactive = !args.plain && std::io::stdout().is_terminal();
    let started = Instant::now();
    let view = {
        let lives: Vec<(Variant, String, LiveHandle)> = runs
            .iter()
            .map(|(v, about, _, l)| (*v, (*about).to_owned(), Arc::clone(l)))
            .collect();
        tokio::spawn(async move {
            let mut shares = ShareWindows::default();
            let variants: Vec<Variant> = lives.iter().map(|(v, _, _)| *v).collect();
            let mut progress = Progress::new(variants.len());
            loop {
                let snapshots: Vec<Live> = lives.iter().map(|(_, _, l)| lock(l).clone()).collect();
                for (i, s) in snapshots.iter().enumerate() {
                    shares.push(i, &s.load.served_by);
                }
                let now = started.elapsed();
                let plain_lines = progress.step(&variants, &snapshots, now);
                if interactive {
                    let mut out = String::from("\x1b[H\x1b[J");
                    out.push_str(POD_LEGEND);
                    out.push_str("\n\n");
                    for (i, ((variant, about, _), s)) in lives.iter().zip(&snapshots).enumerate() {
                        let elapsed = progress.elapsed(i, now);
                        out.push_str(&render(*variant, about, s, &shares.share(i), elapsed));
                    }
                    print!("{out}");
                    let _ = std::io::stdout().flush();
                } else {
                    for line in plain_lines {
                        println!("{line}");
                    }
                }
                if progress.all_finished() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let results = futures::future::join_all(
        runs.iter()
            .map(|(variant, _, cfg, live)| scenario::run(*variant, cfg, Arc::clone(live))),
    )
    .await;
    let _ = view.await;

    let mut reports: Vec<&ScenarioReport> = Vec::new();
    let mut failed = false;
    for ((variant, _, cfg, _), result) in runs.iter().zip(&results) {
        match result {
            Ok(report) => {
                reports.push(report);
                scenario::remove_dir(&cfg.work_dir);
            }
            Err(e) => {
                failed = true;
                eprintln!(
                    "ballast-demo: {} could not run: {e} (logs in {})",
                    variant.label(),
                    cfg.work_dir.display()
                );
            }
        }
    }
    println!(
        "\nDone in {:.0}s.\n\n{}\n",
        started.elapsed().as_secs_f64(),
        scenario::table(&reports)
    );
    if let Some(path) = &args.json {
        let lines: Vec<String> = reports.iter().map(|r| json_line(r).to_string()).collect();
        if let Err(e) = std::fs::write(path, lines.join("\n") + "\n") {
            eprintln!("ballast-demo: cannot write {}: {e}", path.display());
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn json_line(r: &ScenarioReport) -> serde_json::Value {
    serde_json::json!({
        "variant": r.variant.label(),
        "requests": r.load.sent,
        "load_seconds": r.load_time.as_secs_f64(),
        "requests_per_second": r.load.sent as f64 / r.load_time.as_secs_f64().max(0.001),
        "failed": r.load.failed,
        "ws_broken": r.load.ws_broken,
        "ws_forced": r.load.ws_long_closed,
        "balance_before": r.balance_before,
        "balance_after": r.balance_after,
        "rollout_seconds": r.rollout.as_secs_f64(),
        "available_seconds": r.rollout_available.as_secs_f64(),
        "proxy_rollout_seconds": r.proxy_rollout.map(|d| d.as_secs_f64()),
        "pods_drained": r.status.as_ref().map(|s| s.pods_drained),
        "forced_terminations": r.status.as_ref().map(|s| s.forced_terminations),
    })
}

/// What the live view's pod markers and bars mean, shown once above the variants.
const POD_LEGEND: &str = "pods: + new revision, x terminating, . not ready, no mark: old, ready. \
                          bar: share of requests, last 2 s (full: 25%)";

/// What the view remembers between frames: when each variant finished (its clock stops
/// there), the phases already printed, when the counts were printed last.
#[derive(Debug)]
struct Progress {
    finished: Vec<Option<Duration>>,
    phases: Vec<String>,
    counts_at: Duration,
}

impl Progress {
    /// Counts are printed this often while a variant runs.
    const COUNTS_EVERY: Duration = Duration::from_secs(10);

    fn new(variants: usize) -> Self {
        Self {
            finished: vec![None; variants],
            phases: vec![String::new(); variants],
            counts_at: Duration::ZERO,
        }
    }

    /// Takes in the variants' state at `now` (since the start) and returns the lines the
    /// plain output prints: each phase change; every running variant's counts every
    /// [`Self::COUNTS_EVERY`]; a finished variant's counts once, marked final, and
    /// nothing more of it.
    fn step(&mut self, variants: &[Variant], snapshots: &[Live], now: Duration) -> Vec<String> {
        let counts_due = now.saturating_sub(self.counts_at) >= Self::COUNTS_EVERY;
        if counts_due {
            self.counts_at = now;
        }
        let mut lines = Vec::new();
        for (i, (variant, s)) in variants.iter().zip(snapshots).enumerate() {
            let finished_now =
                self.finished[i].is_none() && (s.report.is_some() || s.error.is_some());
            if finished_now {
                self.finished[i] = Some(now);
            }
            let elapsed = self.elapsed(i, now);
            if s.phase != self.phases[i] {
                self.phases[i] = s.phase.clone();
                lines.push(format!(
                    "[{:>5.1}s] {:<20} {}",
                    elapsed.as_secs_f64(),
                    variant.label(),
                    s.phase
                ));
            }
            if finished_now || (counts_due && self.finished[i].is_none()) {
                lines.push(counts(*variant, s, elapsed, finished_now));
            }
        }
        lines
    }

    /// Time since the start for a running variant; when it finished, for a finished one.
    fn elapsed(&self, variant: usize, now: Duration) -> Duration {
        self.finished[variant].unwrap_or(now)
    }

    fn all_finished(&self) -> bool {
        self.finished.iter().all(Option::is_some)
    }
}

/// A plain-output line with a variant's counts so far (`last`: it has finished).
fn counts(variant: Variant, live: &Live, elapsed: Duration, last: bool) -> String {
    let l = &live.load;
    format!(
        "[{:>5.1}s] {:<20} {}requests {} failed {} ws broken {}{}",
        elapsed.as_secs_f64(),
        variant.label(),
        if last { "final: " } else { "" },
        l.sent,
        l.failed,
        l.ws_broken,
        old_pods_stopped(live),
    )
}

/// `  old pods stopped N/M` once the app rollout has started, else nothing.
fn old_pods_stopped(live: &Live) -> String {
    match live.replaced {
        (_, 0) => String::new(),
        (stopped, replicas) => format!("  old pods stopped {stopped}/{replicas}"),
    }
}

/// Requests served per pod, as the clients counted them at one moment.
type Served = BTreeMap<String, u64>;

/// Per-pod request share over the last two seconds, per variant.
#[derive(Default)]
struct ShareWindows {
    history: BTreeMap<usize, VecDeque<(Instant, Served)>>,
}

impl ShareWindows {
    fn push(&mut self, variant: usize, served: &BTreeMap<String, u64>) {
        let h = self.history.entry(variant).or_default();
        h.push_back((Instant::now(), served.clone()));
        while h
            .front()
            .is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(2))
        {
            h.pop_front();
        }
    }

    fn share(&self, variant: usize) -> BTreeMap<String, f64> {
        let Some(h) = self.history.get(&variant) else {
            return BTreeMap::new();
        };
        let (Some((_, first)), Some((_, last))) = (h.front(), h.back()) else {
            return BTreeMap::new();
        };
        let deltas: BTreeMap<String, u64> = last
            .iter()
            .map(|(pod, n)| (pod.clone(), n - first.get(pod).copied().unwrap_or(0)))
            .collect();
        let total: u64 = deltas.values().sum();
        deltas
            .into_iter()
            .map(|(pod, n)| (pod, n as f64 / total.max(1) as f64))
            .collect()
    }
}

fn bar(share: f64) -> String {
    // 20 cells = 25% of all requests; eighths for the remainder.
    const PARTS: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    let eighths = (share / 0.25 * 20.0 * 8.0).round().clamp(0.0, 160.0) as usize;
    let mut s = "█".repeat(eighths / 8);
    s.push_str(PARTS[eighths % 8]);
    format!("{s:<20}")
}

fn render(
    variant: Variant,
    about: &str,
    live: &Live,
    share: &BTreeMap<String, f64>,
    elapsed: Duration,
) -> String {
    let mut out = String::new();
    let l = &live.load;
    let phase = live
        .error
        .as_ref()
        .map_or_else(|| live.phase.clone(), |e| format!("error: {e}"));
    out.push_str(&format!(
        "\x1b[1m{:<20}\x1b[0m {about}\n  {:>5.1}s  {phase}\n",
        variant.label(),
        elapsed.as_secs_f64()
    ));
    let failed = if l.failures_total() > 0 {
        format!("\x1b[31mfailed {}\x1b[0m", l.failed)
    } else {
        format!("failed {}", l.failed)
    };
    out.push_str(&format!(
        "  requests {:<6} {failed}  ws {} ok / {} broken / {} forced{}{}\n",
        l.sent,
        l.ws_completed,
        l.ws_broken,
        l.ws_long_closed,
        old_pods_stopped(live),
        if live.proxies.1 > 0 {
            format!("  proxies ready {}/{}", live.proxies.0, live.proxies.1)
        } else {
            String::new()
        }
    ));
    if live.report.is_some() {
        // The load has stopped: recent shares would say nothing.
        out.push('\n');
        return out;
    }
    let cells: Vec<String> = live
        .pods
        .iter()
        .map(|p| {
            let mark = if p.terminating {
                "x"
            } else if !p.ready {
                "."
            } else if p.new {
                "+"
            } else {
                " "
            };
            let s = share.get(&p.name).copied().unwrap_or(0.0);
            // `demo-<revision>-<n>` -> `<revision>-<n>`
            let parts: Vec<&str> = p.name.rsplitn(3, '-').collect();
            let short = match parts.as_slice() {
                [n, revision, _] => format!("{revision}-{n}"),
                _ => p.name.clone(),
            };
            format!("{mark}{short:<9} {} {:>5.1}%", bar(s), s * 100.0)
        })
        .collect();
    // Three pods a line: 120 columns.
    for row in cells.chunks(3) {
        out.push_str("  ");
        out.push_str(&row.join("  "));
        out.push('\n');
    }
    for (pod, in_flight, connections) in &live.draining {
        out.push_str(&format!(
            "  draining {pod}: {in_flight} in flight, {connections} connections\n"
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
#[path = "ballast-demo/tests.rs"]
mod tests;
