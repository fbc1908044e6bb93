//! What wakes a reconcile besides the BalancedService and its owned objects: the pod
//! changes that matter to the rollout and the readiness gate, coalesced so that a busy
//! rollout delays a reconcile by a bounded time instead of postponing it for as long as
//! events keep coming (kube-runtime's debounce restarts its wait at every trigger).

use ballast_api::BalancedService;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::build::SERVICE_LABEL;
use crate::observe::ROUTABLE_CONDITION;

/// Remembers each pod's [`digest`], to tell a change that matters from one that does not
/// (a status heartbeat, an annotation, the operator's own condition message).
#[derive(Debug, Default)]
pub struct PodChanges {
    digests: HashMap<String, u64>,
}

impl PodChanges {
    /// The BalancedServices to reconcile after `event`.
    pub fn triggers(&mut self, event: &watcher::Event<Pod>) -> Vec<ObjectRef<BalancedService>> {
        match event {
            watcher::Event::Init => {
                self.digests.clear();
                Vec::new()
            }
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let key = pod_key(pod);
                let new = digest(pod);
                if self.digests.insert(key, new) == Some(new) {
                    Vec::new()
                } else {
                    owner(pod).into_iter().collect()
                }
            }
            watcher::Event::Delete(pod) => {
                self.digests.remove(&pod_key(pod));
                owner(pod).into_iter().collect()
            }
            watcher::Event::InitDone => Vec::new(),
        }
    }
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// What of a pod the operator acts on: its BalancedService and role labels, revision,
/// IP, phase, deletion, readiness and the `ballast.dev/routable` condition's value.
pub fn digest(pod: &Pod) -> u64 {
    let labels: BTreeMap<&str, &str> = pod
        .labels()
        .iter()
        .filter(|(k, _)| k.starts_with("ballast.dev/"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let status = pod.status.as_ref();
    let condition = |type_: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == type_))
            .map(|c| c.status.clone())
    };
    let mut hasher = DefaultHasher::new();
    (
        labels,
        pod.metadata.deletion_timestamp.is_some(),
        status.and_then(|s| s.pod_ip.as_deref()),
        status.and_then(|s| s.phase.as_deref()),
        condition("Ready"),
        condition(ROUTABLE_CONDITION),
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// The BalancedService a pod's `ballast.dev/service` label names.
fn owner(pod: &Pod) -> Option<ObjectRef<BalancedService>> {
    let name = pod.labels().get(SERVICE_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// Passes each object on `window` after its first trigger, however many more come
/// meanwhile; a trigger after that starts a new window. So a reconcile waits at most
/// `window` for a burst to settle, never longer.
pub fn coalesce<T>(
    triggers: impl Stream<Item = T> + Send + 'static,
    window: Duration,
) -> impl Stream<Item = T> + Send + 'static
where
    T: Clone + Eq + Hash + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut triggers = std::pin::pin!(triggers);
        let mut due: HashMap<T, Instant> = HashMap::new();
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                // What is due goes out before a trigger arriving at the same instant
                // is absorbed into the window that just ended.
                biased;
                () = sleep_until(next) => {
                    let now = Instant::now();
                    let ready: Vec<T> = due
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(t, _)| t.clone())
                        .collect();
                    for t in ready {
                        due.remove(&t);
                        if tx.send(t).is_err() {
                            return;
                        }
                    }
                }
                trigger = triggers.next() => match trigger {
                    Some(t) => {
                        due.entry(t).or_insert_with(|| Instant::now() + window);
                    }
                    None => break,
                },
            }
        }
        // The source ended: what is pending still goes out, at once.
        for t in due.into_keys() {
            let _ = tx.send(t);
        }
    });
    receiver_stream(rx)
}

/// The messages of `rx` as a stream that ends when every sender is gone.
pub fn receiver_stream<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ready: &str, annotation: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "demo-1", "namespace": "shop",
                         "labels": {"ballast.dev/service": "demo", "ballast.dev/role": "app"},
                         "annotations": {"note": annotation}, "resourceVersion": annotation},
            "status": {"podIP": "10.0.0.1", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    #[test]
    fn only_changes_that_matter_trigger() {
        let mut changes = PodChanges::default();
        let demo = ObjectRef::<BalancedService>::new("demo").within("shop");
        let apply = |changes: &mut PodChanges, p: Pod| changes.triggers(&watcher::Event::Apply(p));
        assert_eq!(apply(&mut changes, pod("False", "a")), vec![demo.clone()]);
        assert!(
            apply(&mut changes, pod("False", "b")).is_empty(),
            "an annotation and a new resourceVersion are no news"
        );
        assert_eq!(apply(&mut changes, pod("True", "b")), vec![demo.clone()]);
        let mut deleting = pod("True", "c");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(apply(&mut changes, deleting.clone()), vec![demo.clone()]);
        assert_eq!(
            changes.triggers(&watcher::Event::Delete(deleting)),
            vec![demo],
            "a pod gone always counts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_triggers_delays_a_reconcile_by_one_window_at_most() {
        let (tx, rx) = mpsc::unbounded_channel::<&'static str>();
        let source = receiver_stream(rx);
        let out = coalesce(source, Duration::from_millis(500));
        let mut out = std::pin::pin!(out);
        let start = Instant::now();
        // A trigger every 100 ms for 3 s (a busy rollout): the object still comes out
        // every 500 ms, not once at the end.
        let feeder = tokio::spawn(async move {
            for _ in 0..30 {
                tx.send("demo").unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut seen = Vec::new();
        while seen.len() < 6 {
            out.next().await.unwrap();
            seen.push(Instant::now() - start);
        }
        feeder.await.unwrap();
        assert_eq!(seen[0], Duration::from_millis(500), "{seen:?}");
        for pair in seen.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(500) && gap <= Duration::from_millis(600),
                "{seen:?}"
            );
        }
    }
}
