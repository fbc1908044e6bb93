//! Reads every BalancedService's proxies in the background and wakes its reconcile when
//! what they report changed in a way the operator acts on (a pod listed or no longer,
//! a drain started or finished, a failure counted). Reconciles then read the latest
//! reading instead of calling the proxies, and nothing needs a short requeue: during a
//! rollout the API server sees a reconcile per change, not one per second.

use ballast_api::BalancedService;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::observe::{ProxyObservation, ProxyPod};

/// How often the proxies of a BalancedService in a rollout (or with pods waiting for
/// the readiness gate, or draining) are read.
pub const BUSY_PERIOD: Duration = Duration::from_secs(1);
/// How often the proxies of a settled BalancedService are read.
pub const QUIET_PERIOD: Duration = Duration::from_secs(10);
/// A reading older than this is not used by a reconcile (it reads the proxies itself).
pub const FRESH: Duration = Duration::from_secs(3);

/// The latest reading of each BalancedService's proxies.
#[derive(Debug, Default)]
pub struct ProxyReadings {
    readings: Mutex<HashMap<ObjectRef<BalancedService>, Reading>>,
}

#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    proxies: Vec<String>,
    observations: Vec<ProxyObservation>,
    digest: u64,
}

impl ProxyReadings {
    /// The reading for `bs`, when it is younger than [`FRESH`] and covers exactly
    /// `proxies` (a proxy that became ready since must be read before it counts).
    pub fn fresh(
        &self,
        bs: &ObjectRef<BalancedService>,
        proxies: &[ProxyPod],
    ) -> Option<Vec<ProxyObservation>> {
        let readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
        let reading = readings.get(bs)?;
        let mut names: Vec<String> = proxies.iter().map(|p| p.name.clone()).collect();
        names.sort();
        (reading.at.elapsed() < FRESH && reading.proxies == names)
            .then(|| reading.observations.clone())
    }

    /// Stores a reading; true when it differs from the previous one in what the
    /// operator acts on.
    pub fn record(
        &self,
        bs: ObjectRef<BalancedService>,
        proxies: &[ProxyPod],
        observations: Vec<ProxyObservation>,
    ) -> bool {
        let mut names: Vec<String> = proxies.iter().map(|p| p.name.clone()).collect();
        names.sort();
        let digest = digest(&observations);
        let mut readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = readings.get(&bs).is_none_or(|r| r.digest != digest);
        readings.insert(
            bs,
            Reading {
                at: Instant::now(),
                proxies: names,
                observations,
                digest,
            },
        );
        changed
    }

    /// When `bs` was last read.
    fn last(&self, bs: &ObjectRef<BalancedService>) -> Option<Instant> {
        self.readings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(bs)
            .map(|r| r.at)
    }

    /// Forgets BalancedServices not in `live`.
    fn retain(&self, live: &[ObjectRef<BalancedService>]) {
        self.readings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| live.contains(k));
    }
}

/// What of the proxies' reports the operator acts on: which proxies answered, each
/// endpoint's pod, state, whether anything is open on it and its failure count, and
/// the finished drains. Request counters and latencies are left out: they change all
/// the time and only feed figures a later reconcile picks up anyway.
pub fn digest(observations: &[ProxyObservation]) -> u64 {
    let mut hasher = DefaultHasher::new();
    let mut sorted: Vec<&ProxyObservation> = observations.iter().collect();
    sorted.sort_by(|a, b| a.proxy.cmp(&b.proxy));
    for o in sorted {
        o.proxy.hash(&mut hasher);
        match &o.report {
            Err(_) => false.hash(&mut hasher),
            Ok(report) => {
                true.hash(&mut hasher);
                for e in &report.endpoints {
                    (
                        e.address,
                        &e.pod,
                        &e.state,
                        e.listed,
                        e.in_flight > 0,
                        e.connections > 0,
                        e.errors,
                        e.forced.map(|f| (f.in_flight, f.connections)),
                        e.drained_after_ms,
                    )
                        .hash(&mut hasher);
                }
                for d in &report.drains {
                    (d.address, &d.pod, d.since.to_bits(), d.drained_after_ms).hash(&mut hasher);
                }
            }
        }
    }
    hasher.finish()
}

/// True when `bs` needs its proxies read every [`BUSY_PERIOD`]: a rollout runs, pods
/// drain, or the last status says pods wait for the proxies.
fn busy(bs: &BalancedService) -> bool {
    bs.status.as_ref().is_some_and(|s| {
        !s.draining.is_empty()
            || s.conditions
                .iter()
                .any(|c| c.type_ == "Progressing" && c.status == "True")
            || s.last_rollout
                .as_ref()
                .is_some_and(|r| r.finished_at.is_none())
    })
}

/// Reads the proxies of every BalancedService in `services` on their period, records
/// the readings in `readings` and sends the ones that changed to `changed`. Runs until
/// `changed` is closed.
pub async fn run(
    services: Store<BalancedService>,
    proxies_of: impl Fn(&BalancedService) -> Vec<ProxyPod>,
    reader: crate::observe::ProxyReader,
    readings: &ProxyReadings,
    changed: mpsc::UnboundedSender<ObjectRef<BalancedService>>,
) {
    let mut tick = tokio::time::interval(BUSY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if changed.is_closed() {
            return;
        }
        let live = services.state();
        let refs: Vec<ObjectRef<BalancedService>> =
            live.iter().map(|bs| ObjectRef::from(bs.as_ref())).collect();
        readings.retain(&refs);
        let due = live.iter().zip(refs).filter(|(bs, key)| {
            let period = if busy(bs) { BUSY_PERIOD } else { QUIET_PERIOD };
            readings
                .last(key)
                .is_none_or(|at| at.elapsed() + Duration::from_millis(100) >= period)
        });
        let reads = due.map(|(bs, key)| {
            let proxies = proxies_of(bs);
            let reader = &reader;
            async move {
                let observations = reader.observe(&proxies).await;
                (key, proxies, observations, bs.name_any())
            }
        });
        for (key, proxies, observations, name) in futures::future::join_all(reads).await {
            if proxies.is_empty() {
                continue;
            }
            if readings.record(key.clone(), &proxies, observations) {
                tracing::debug!(%name, "proxies report a change");
                if changed.send(key).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::ProxyReport;
    use ballast_api::admin::{EndpointReport, EndpointStatus};

    fn reading(in_flight: u64, requests: u64, state: EndpointStatus) -> Vec<ProxyObservation> {
        vec![ProxyObservation {
            proxy: "p".into(),
            report: Ok(ProxyReport {
                endpoints: vec![EndpointReport {
                    pod: Some("a".into()),
                    in_flight,
                    requests,
                    ..EndpointReport::new("10.0.0.1:8080".parse().unwrap(), state)
                }],
                drains: vec![],
            }),
        }]
    }

    #[test]
    fn only_what_the_operator_acts_on_is_a_change() {
        let base = digest(&reading(3, 100, EndpointStatus::Active));
        assert_eq!(
            base,
            digest(&reading(5, 900, EndpointStatus::Active)),
            "traffic alone"
        );
        assert_ne!(
            base,
            digest(&reading(0, 100, EndpointStatus::Active)),
            "nothing left in flight"
        );
        assert_ne!(
            base,
            digest(&reading(3, 100, EndpointStatus::Draining)),
            "a drain started"
        );
        let unreadable = vec![ProxyObservation {
            proxy: "p".into(),
            report: Err("timeout".into()),
        }];
        assert_ne!(base, digest(&unreadable));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_is_used_only_while_fresh_and_for_the_same_proxies() {
        let readings = ProxyReadings::default();
        let bs = ObjectRef::<BalancedService>::new("demo").within("shop");
        let proxy = |name: &str| ProxyPod {
            name: name.into(),
            admin: "127.0.0.1:9901".parse().unwrap(),
        };
        let one = [proxy("p")];
        assert!(readings.record(bs.clone(), &one, reading(1, 1, EndpointStatus::Active)));
        assert!(!readings.record(bs.clone(), &one, reading(2, 9, EndpointStatus::Active)));
        assert!(readings.fresh(&bs, &one).is_some());
        assert!(
            readings.fresh(&bs, &[proxy("p"), proxy("q")]).is_none(),
            "a proxy not read yet"
        );
        tokio::time::advance(FRESH).await;
        assert!(readings.fresh(&bs, &one).is_none(), "too old");
    }
}
