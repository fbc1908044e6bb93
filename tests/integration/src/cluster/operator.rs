//! The operator's pod-facing half, run in process against the stand-in's pods: every
//! second it reads every ready proxy replica's `/endpoints` and `/drains` with the
//! operator's own [`ProxyReader`], sets the readiness gate `ballast.dev/routable` with
//! [`gate::decide`], tracks the rollout with [`rollout::track`] and pauses or rolls it
//! back with [`rollout::decide`], as the operator does. The numbers it keeps are what
//! the BalancedService's status would say.

use crate::lock;
use ballast_api::spec::PauseThresholds;
use ballast_api::status::{BalanceSummary, DrainingPod, RolloutSummary};
use ballast_operator::observe::{AppPod, ProxyPod, ProxyReader, ROUTABLE_CONDITION};
use ballast_operator::{gate, rollout};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Deployment;
use super::pod::Pod;

/// How often the stand-in looks, like the operator while pods wait or drain.
const PERIOD: Duration = Duration::from_secs(1);

/// What the BalancedService's status would carry.
#[derive(Clone, Debug, Default)]
pub struct StatusView {
    /// `status.lastRollout`.
    pub last_rollout: Option<RolloutSummary>,
    /// `status.draining`.
    pub draining: Vec<DrainingPod>,
    /// `status.balance`.
    pub balance: Option<BalanceSummary>,
    /// Events the operator would have emitted (reason: message).
    pub events: Vec<String>,
    /// Proxy replicas read in the last round.
    pub proxies_read: usize,
    /// Rounds finished.
    pub rounds: u64,
}

/// Waits until `rounds` more rounds have finished (with 2, one whole round began after
/// the call), for at most 10 s per round; false when they did not.
pub async fn next_round(view: &Mutex<StatusView>, rounds: u64) -> bool {
    let target = lock(view).rounds + rounds;
    let deadline = tokio::time::Instant::now() + PERIOD * 10 * u32::try_from(rounds).unwrap_or(1);
    while lock(view).rounds < target {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// The ready proxy replicas of `proxies`, with their admin addresses.
pub fn ready_proxies(proxies: &Deployment, admin_port: u16) -> Vec<ProxyPod> {
    proxies
        .pods()
        .iter()
        .filter(|p| p.ready() && p.status().deleted_at.is_none())
        .map(|p| ProxyPod {
            name: p.identity.name.clone(),
            admin: SocketAddr::new(IpAddr::V4(p.identity.ip), admin_port),
        })
        .collect()
}

/// A stand-in pod as the operator sees it.
pub fn app_pod(p: &Pod) -> AppPod {
    let s = p.status();
    AppPod {
        name: p.identity.name.clone(),
        ip: Some(IpAddr::V4(p.identity.ip)),
        revision: Some(p.revision.clone()),
        deleting: s.deleted_at.is_some(),
        routable: s.gates.get(ROUTABLE_CONDITION).copied(),
        routable_message: None,
        gated: p.has_gate(ROUTABLE_CONDITION),
        ready: p.ready(),
        retired: p.retired(),
    }
}

/// Starts the gate and tracking over `app`'s pods, reading the proxies of `proxies` on
/// `admin_port`, pausing `app` when a rollout crosses `pause_when`. Runs until the
/// runtime ends.
pub fn start(
    app: Deployment,
    proxies: Deployment,
    admin_port: u16,
    pause_when: PauseThresholds,
) -> Arc<Mutex<StatusView>> {
    let view = Arc::new(Mutex::new(StatusView::default()));
    let shared = Arc::clone(&view);
    tokio::spawn(async move {
        let reader = ProxyReader::new(Duration::from_secs(2));
        let mut memory = rollout::Memory::default();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ready = ready_proxies(&proxies, admin_port);
            let observations = reader.observe(&ready).await;
            let pods = app.pods();
            let app_pods: Vec<AppPod> = pods.iter().map(|p| app_pod(p)).collect();
            for (pod, seen) in pods.iter().zip(&app_pods) {
                let verdict = gate::decide(seen, &observations);
                if let Some((value, _)) = gate::change(seen, &verdict) {
                    pod.set_gate(ROUTABLE_CONDITION, value);
                }
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let revision = app.plan().pod.revision;
            let previous = lock(&shared).last_rollout.clone();
            let mut tracked = rollout::track(
                &mut memory,
                &rollout::Inputs {
                    now,
                    update_revision: &revision,
                    pods: &app_pods,
                    proxies: &observations,
                    previous: previous.as_ref(),
                },
            );
            // The stand-in has one generation and no resume annotation: a pause holds.
            let action = rollout::decide(
                &mut tracked,
                &rollout::Policy {
                    thresholds: &pause_when,
                    generation: 1,
                    request: None,
                    now,
                },
            );
            match action {
                rollout::RolloutAction::Proceed => app.set_paused(false),
                rollout::RolloutAction::Pause => app.set_paused(true),
                rollout::RolloutAction::RollBack { revision } => {
                    let restored = app.roll_back(&revision);
                    app.set_paused(!restored);
                }
            }
            let mut view = lock(&shared);
            view.rounds += 1;
            view.proxies_read = observations.iter().filter(|o| o.report.is_ok()).count();
            view.draining = tracked.draining;
            if tracked.last_rollout.is_some() {
                view.last_rollout = tracked.last_rollout;
            }
            if tracked.balance.is_some() {
                view.balance = tracked.balance;
            }
            view.events.extend(
                tracked
                    .events
                    .into_iter()
                    .map(|t| format!("{}: {}", t.reason, t.message)),
            );
        }
    });
    view
}
