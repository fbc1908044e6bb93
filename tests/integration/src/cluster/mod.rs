//! A local stand-in for what a Kubernetes cluster does with the Deployments the operator
//! builds. It is a test harness, never presented as Kubernetes:
//!
//! * a pod is a local process on its own loopback address (`127.x.y.z`) and the
//!   container port; `0.0.0.0` or `[::]` in its argv means that address (every pod
//!   shares the host's network here); images and in-pod paths map to local programs;
//! * kubelet: startup and readiness probes as specified (HTTP GET), readiness gates
//!   honoured, and on deletion the preStop hook, then SIGTERM, then SIGKILL at the
//!   grace period ([`pod`]);
//! * the Deployment controller: the rolling update's maxSurge / maxUnavailable /
//!   minReadySeconds ([`rolling`]);
//! * the EndpointSlice controller: ready / serving / terminating per pod, delivered
//!   after a propagation delay as `discovery.k8s.io/v1` EndpointSlices of the backends
//!   Service (labelled `kubernetes.io/service-name`, its port name and appProtocol,
//!   `targetRef` to the pod) in the API stand-in ([`crate::apiserver`]), or in process
//!   to the kube-proxy stand-in ([`feed`], [`crate::l4`]);
//! * the API server's read path ([`crate::apiserver`]): the proxies run exactly as the
//!   operator renders them (`--kube-service <name>-backends --port=...`, the
//!   namespace from the pod's environment) and list/watch their EndpointSlices through
//!   kube's client and watcher; every container gets a `KUBECONFIG` for it, where a
//!   cluster gives the API server's address and a service-account token;
//! * the operator's pod-facing half: the readiness gate and rollout tracking, computed
//!   by the operator's own functions over the real proxies' reports ([`operator`]).
//!
//! What it leaves out: scheduling, nodes and resources, init containers (the drain
//! helper's install is a path mapping), DNS (a preStop's `--proxies` name is replaced
//! by the proxy pods' addresses when the hook starts), container restarts, RBAC and
//! authentication on the API, Pod and Deployment objects in the API (the operator's
//! pod-facing half reads the pods in process).

pub mod feed;
pub mod operator;
pub mod plan;
pub mod pod;
pub mod rolling;

use crate::lock;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

use feed::{EndpointFeed, FeedEntry};
use plan::DeploymentPlan;
use pod::{Pod, PodIdentity, PodRuntime};
use rolling::PodView;

/// How often the Deployment controller stand-in reconciles.
const RECONCILE: Duration = Duration::from_millis(100);

/// A Deployment being acted out: its pods, its rolling update, and the EndpointSlice
/// feed of the Service that selects its pods. Dropping it stops the controller; the
/// pods' processes are killed when the runtime ends.
#[derive(Clone, Debug)]
pub struct Deployment {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    namespace: String,
    plan: Mutex<DeploymentPlan>,
    /// Every plan applied before the one in force, oldest first (ReplicaSets' templates).
    previous: Mutex<Vec<DeploymentPlan>>,
    /// `spec.paused`: the rolling update takes no step.
    paused: AtomicBool,
    pods: Mutex<Vec<Arc<Pod>>>,
    history: Mutex<Vec<Arc<Pod>>>,
    runtime: PodRuntime,
    feed: EndpointFeed,
    prefix: [u8; 3],
    next_host: AtomicU32,
    serial: AtomicU32,
}

impl Deployment {
    /// Creates the Deployment's pods from `plan`, with addresses `prefix.2`,
    /// `prefix.3`, ..., and keeps reconciling it; its endpoints go to `feed`.
    pub fn start(
        plan: DeploymentPlan,
        namespace: &str,
        runtime: PodRuntime,
        prefix: [u8; 3],
        feed: EndpointFeed,
    ) -> Self {
        let inner = Arc::new(Inner {
            namespace: namespace.to_owned(),
            plan: Mutex::new(plan),
            previous: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            pods: Mutex::new(Vec::new()),
            history: Mutex::new(Vec::new()),
            runtime,
            feed,
            prefix,
            next_host: AtomicU32::new(0),
            serial: AtomicU32::new(0),
        });
        tokio::spawn(reconcile_loop(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Applies a new plan (a changed template starts a rollout).
    pub fn apply(&self, plan: DeploymentPlan) {
        let before = std::mem::replace(&mut *lock(&self.inner.plan), plan);
        lock(&self.inner.previous).push(before);
    }

    /// Sets `spec.paused`: while paused the rolling update creates and deletes no pod.
    pub fn set_paused(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::Relaxed);
    }

    /// True while paused.
    pub fn paused(&self) -> bool {
        self.inner.paused.load(Ordering::Relaxed)
    }

    /// Puts back the last plan applied with pod revision `revision`, as restoring a
    /// ReplicaSet's template does; false when no such plan was applied.
    pub fn roll_back(&self, revision: &str) -> bool {
        if self.plan().pod.revision == revision {
            return true;
        }
        let plan = lock(&self.inner.previous)
            .iter()
            .rev()
            .find(|p| p.pod.revision == revision)
            .cloned();
        match plan {
            Some(plan) => {
                self.apply(plan);
                true
            }
            None => false,
        }
    }

    /// The plan in force.
    pub fn plan(&self) -> DeploymentPlan {
        lock(&self.inner.plan).clone()
    }

    /// Pods whose process has not exited yet (terminating ones included).
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        lock(&self.inner.pods).clone()
    }

    /// Every pod ever created, in creation order.
    pub fn history(&self) -> Vec<Arc<Pod>> {
        lock(&self.inner.history).clone()
    }

    /// The EndpointSlice feed of the Service over these pods.
    pub fn feed(&self) -> &EndpointFeed {
        &self.inner.feed
    }

    /// The Deployment controller's "complete": `replicas` active pods, all of the
    /// current template and available. Terminating pods may still be stopping.
    pub fn complete(&self) -> bool {
        let plan = self.plan();
        let now = Instant::now();
        let active: Vec<Arc<Pod>> = self
            .pods()
            .into_iter()
            .filter(|p| p.status().deleted_at.is_none())
            .collect();
        active.len() == plan.rollout.replicas as usize
            && active.iter().all(|p| {
                p.revision == plan.pod.revision
                    && p.status()
                        .ready_since
                        .is_some_and(|t| now - t >= plan.rollout.min_ready)
            })
    }

    /// [`Deployment::complete`], and every other pod is gone (stopped).
    pub fn rolled_out(&self) -> bool {
        self.complete() && self.pods().len() == self.plan().rollout.replicas as usize
    }

    /// Waits until [`Deployment::rolled_out`]; returns how long it took.
    ///
    /// # Errors
    /// When it is not rolled out within `limit`, saying what the pods are doing, or a
    /// pod failed to start.
    pub async fn wait_rolled_out(&self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        while !self.rolled_out() {
            if let Some(e) = self.history().iter().find_map(|p| p.status().error) {
                return Err(e);
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{} not rolled out within {limit:?}: {}",
                    self.plan().name,
                    self.describe()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(start.elapsed())
    }

    /// One line on every pod: name, revision, ready, terminating.
    pub fn describe(&self) -> String {
        self.pods()
            .iter()
            .map(|p| {
                let s = p.status();
                format!(
                    "{}({}{}{})",
                    p.identity.name,
                    if p.ready() { "ready" } else { "unready" },
                    if s.deleted_at.is_some() {
                        ",terminating"
                    } else {
                        ""
                    },
                    s.error.map(|e| format!(",{e}")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Inner {
    fn next_ip(&self, in_use: &[Arc<Pod>]) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        loop {
            let host = 2 + (self.next_host.fetch_add(1, Ordering::Relaxed) % 253) as u8;
            let ip = Ipv4Addr::new(a, b, c, host);
            if !in_use.iter().any(|p| p.identity.ip == ip) {
                return ip;
            }
        }
    }

    fn reconcile(&self, last: &mut Option<Vec<FeedEntry>>) {
        let plan = lock(&self.plan).clone();
        let mut pods = lock(&self.pods);
        pods.retain(|p| p.status().exited_at.is_none());
        let now = Instant::now();
        let views: Vec<PodView> = pods
            .iter()
            .map(|p| {
                let s = p.status();
                PodView {
                    current: p.revision == plan.pod.revision,
                    ready_for: s.ready_since.map(|t| now - t),
                    terminating: s.deleted_at.is_some(),
                    deletion_cost: if p.retired().is_some() {
                        i64::from(i32::MIN)
                    } else {
                        0
                    },
                }
            })
            .collect();
        let step = if self.paused.load(Ordering::Relaxed) {
            rolling::Step::default()
        } else {
            rolling::step(&plan.rollout, &views)
        };
        for index in &step.delete {
            pods[*index].delete();
        }
        for _ in 0..step.create {
            let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
            let identity = PodIdentity {
                name: format!("{}-{}-{serial}", plan.name, plan.pod.revision),
                namespace: self.namespace.clone(),
                ip: self.next_ip(&pods),
            };
            let pod = pod::start(identity, &plan.pod, &self.runtime);
            lock(&self.history).push(Arc::clone(&pod));
            pods.push(pod);
        }
        // A retired pod has left the backends Service (its label no longer matches).
        let entries: Vec<FeedEntry> = pods
            .iter()
            .filter(|p| p.retired().is_none())
            .filter_map(|p| {
                let s = p.status();
                let ready = p.ready();
                // A deleted pod is terminating at once: the EndpointSlice controller
                // watches the deletion, not the process.
                let terminating = s.deleted_at.is_some();
                (s.running || s.deleted_at.is_some()).then(|| FeedEntry {
                    address: p.address(),
                    name: p.identity.name.clone(),
                    ready: ready && !terminating,
                    serving: ready,
                    terminating,
                })
            })
            .collect();
        if last.as_ref() != Some(&entries) {
            self.feed.publish(entries.clone());
            *last = Some(entries);
        }
    }
}

async fn reconcile_loop(inner: Weak<Inner>) {
    let mut last = None;
    let mut tick = tokio::time::interval(RECONCILE);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.reconcile(&mut last);
    }
}
