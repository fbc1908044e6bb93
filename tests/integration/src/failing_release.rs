//! A release that fails, on the local cluster stand-in: the new revision answers half
//! of its requests with 500. The operator's stand-in reads the proxies' counts per
//! revision, and [`ballast_operator::rollout::decide`] pauses the rollout once the new
//! revision's error ratio crosses the threshold, and with `rollback` puts the previous
//! template back, as the operator does on a cluster.

use crate::load::{Load, LoadPlan, LoadStats};
use crate::lock;
use crate::scenario::{LiveHandle, ScenarioConfig, Stage, Variant, stage};
use ballast_api::spec::PauseThresholds;
use ballast_api::status::RolloutSummary;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the stand-in may take to notice the failing revision.
const NOTICE_LIMIT: Duration = Duration::from_secs(60);
/// How long a rollback may take to put every pod of the old revision back.
const ROLLBACK_LIMIT: Duration = Duration::from_secs(90);

/// What happened to the failing release.
#[derive(Clone, Debug)]
pub struct FailingReleaseReport {
    /// The revision that was running before.
    pub old_revision: String,
    /// The failing revision.
    pub new_revision: String,
    /// The failing rollout's summary when the stand-in paused it (its `paused` says
    /// why and when).
    pub at_pause: RolloutSummary,
    /// The last rollout summary at the end: after a rollback, the rollout back to the
    /// old revision.
    pub at_end: Option<RolloutSummary>,
    /// Events the operator would have emitted.
    pub events: Vec<String>,
    /// From applying the failing template until the pause was recorded.
    pub noticed_after: Duration,
    /// The revision of the template in force at the end.
    pub final_revision: String,
    /// Whether the Deployment is still paused at the end.
    pub paused: bool,
    /// Pods of the failing revision ever started.
    pub new_pods_started: usize,
    /// Pods of the failing revision still running at the end.
    pub new_pods_running: usize,
    /// Pods of the old revision the rollout stopped.
    pub old_pods_stopped: usize,
    /// What the clients saw.
    pub load: LoadStats,
}

/// Rolls out a release whose pods fail `fail_percent` of requests, under load, with
/// `thresholds`, and reports what the stand-in did.
///
/// # Errors
/// When the stand-in cannot run, it never pauses, or a rollback does not finish.
pub async fn run(
    cfg: &ScenarioConfig,
    thresholds: PauseThresholds,
    fail_percent: u8,
) -> Result<FailingReleaseReport, String> {
    let live = LiveHandle::default();
    let rollback = thresholds.rollback;
    let Stage {
        app,
        front,
        status,
        app_next,
        ..
    } = stage(Variant::Ballast, cfg, &live, Some(thresholds)).await?;
    let status = status.ok_or("the ballast variant has an operator stand-in")?;
    let load = Load::start(&LoadPlan::short(
        front.addr,
        cfg.rate,
        cfg.clients,
        cfg.seed,
        NOTICE_LIMIT + ROLLBACK_LIMIT + Duration::from_secs(30),
    ));

    let old_revision = app.plan().pod.revision;
    let mut failing = app_next;
    failing
        .pod
        .args
        .push(format!("--fail-percent={fail_percent}"));
    let new_revision = failing.pod.revision.clone();
    let applied = Instant::now();
    app.apply(failing);

    let paused = |s: &Mutex<crate::cluster::operator::StatusView>| {
        lock(s)
            .last_rollout
            .clone()
            .filter(|r| r.revision == new_revision && r.paused.is_some())
    };
    let at_pause = loop {
        if let Some(summary) = paused(&status) {
            break summary;
        }
        if applied.elapsed() > NOTICE_LIMIT {
            return Err(format!(
                "the failing release was not paused within {NOTICE_LIMIT:?}: {:?}; {}",
                lock(&status).last_rollout,
                app.describe()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let noticed_after = applied.elapsed();

    if rollback {
        let started = Instant::now();
        while !(app.plan().pod.revision == old_revision && app.rolled_out()) {
            if started.elapsed() > ROLLBACK_LIMIT {
                return Err(format!(
                    "the rollback did not finish within {ROLLBACK_LIMIT:?}: {}",
                    app.describe()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        // Two more rounds of the stand-in: a pause holds.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let stats = load.stop().await;
    let history = app.history();
    let of = |revision: &str| {
        history
            .iter()
            .filter(|p| p.revision == revision)
            .collect::<Vec<_>>()
    };
    let (at_end, events) = {
        let s = lock(&status);
        (s.last_rollout.clone(), s.events.clone())
    };
    let report = FailingReleaseReport {
        noticed_after,
        final_revision: app.plan().pod.revision,
        paused: app.paused(),
        new_pods_started: of(&new_revision).len(),
        new_pods_running: of(&new_revision)
            .iter()
            .filter(|p| p.status().exited_at.is_none())
            .count(),
        old_pods_stopped: of(&old_revision)
            .iter()
            .filter(|p| p.status().exited_at.is_some())
            .count(),
        old_revision,
        new_revision,
        at_pause,
        at_end,
        events,
        load: stats,
    };
    drop(front);
    Ok(report)
}
