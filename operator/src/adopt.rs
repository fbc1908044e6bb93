//! Adopting a Deployment (`spec.workloadRef`) without losing a request: when the front
//! Service may switch to the proxies, how the first rollout (the one that adds the drain
//! gate to pods started without it) retires each old pod before the Deployment
//! controller deletes it, and the steps that give everything back. Pure decisions; the
//! controller reads and writes.
//!
//! **The first rollout.** An old pod has no preStop hook: once deleted it gets SIGTERM
//! at once, and an app that exits on SIGTERM loses what it was serving. So no old pod may
//! be deleted while a proxy still has a request on it. The operator cannot delay a
//! deletion, but it decides when one happens: the Deployment controller deletes old
//! pods only as new ones become available, and a new pod becomes available only once
//! the operator opens its readiness gate. With `maxUnavailable` u, after k new pods are
//! available it keeps `desired - u - k` old ones, deleting the lowest
//! `controller.kubernetes.io/pod-deletion-cost` first. Before opening a gate the operator
//! therefore *retires* an old pod: it takes the pod out of the backends Service (its
//! `ballast.dev/backend` label stops being `true`, so every proxy stops routing to it)
//! and gives it the lowest deletion cost, then waits until every proxy reports nothing in
//! flight and no connection to it (bounded by `drainTimeoutSeconds`). A gate opens only
//! while the deletions it would cause are all of retired, drained pods.

use ballast_api::BalancedService;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;

use crate::build::selector_labels;
use crate::observe::{AppPod, ProxyObservation};

/// Value of `controller.kubernetes.io/pod-deletion-cost` on a retired pod: the lowest,
/// so the ReplicaSet controller deletes it before any other ready pod.
pub const RETIRED_DELETION_COST: &str = "-2147483648";
/// Prefix of the `ballast.dev/backend` label of a retired pod, before the Unix second it
/// was retired at.
pub const RETIRED_PREFIX: &str = "retired-";
/// Annotation the ReplicaSet controller ranks pods by when scaling down.
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// What the first rollout of an adopted Deployment allows now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    /// How many more new pods' gates may open (`None`: no limit, no old pod is left).
    pub open: Option<usize>,
    /// An old pod to retire now.
    pub retire: Option<String>,
    /// Retired pods still draining: name, and what the proxies still have on it.
    pub draining: Vec<(String, String)>,
}

/// The first-rollout guard for `pods` of a Deployment wanting `desired` pods with
/// `max_unavailable` (resolved to a count), given what every ready proxy reports. `now`
/// and `drain_timeout` are seconds; a retired pod counts as drained once it has been
/// retired for `drain_timeout`, as the drain gate gives up after that time too.
pub fn guard(
    desired: i32,
    max_unavailable: i32,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
    now: i64,
    drain_timeout: i64,
) -> Guard {
    let old: Vec<&AppPod> = pods.iter().filter(|p| !p.gated && !p.deleting).collect();
    if old.is_empty() {
        return Guard::default();
    }
    let mut guard = Guard::default();
    let mut drained = 0usize;
    for pod in old.iter().filter(|p| p.retired.is_some()) {
        let since = pod.retired.unwrap_or(now);
        match open_on(pod, proxies) {
            None => drained += 1,
            Some(_) if now - since >= drain_timeout => drained += 1,
            Some(what) => guard.draining.push((pod.name.clone(), what)),
        }
    }
    let routable_new = pods
        .iter()
        .filter(|p| p.gated && !p.deleting && p.routable == Some(true))
        .count();
    // Deletions once k new pods are available: old - (desired - u - k). Safe while they
    // are at most the retired, drained pods.
    let allowed =
        i64::from(desired) - i64::from(max_unavailable) - old.len() as i64 + drained as i64;
    let open = usize::try_from(allowed - routable_new as i64).unwrap_or(0);
    guard.open = Some(open);
    let waiting = pods
        .iter()
        .any(|p| p.gated && !p.deleting && p.routable != Some(true));
    if waiting && open == 0 && guard.draining.is_empty() {
        // Not-ready pods first (they serve nothing), then by name, for a stable choice.
        guard.retire = old
            .iter()
            .filter(|p| p.retired.is_none())
            .min_by_key(|p| (p.ready, p.name.clone()))
            .map(|p| p.name.clone());
    }
    guard
}

/// What the proxies still have open on `pod`, or `None` when none has anything (or
/// none lists it any more). An unreadable proxy counts as open: drained is a
/// measurement, never a guess.
fn open_on(pod: &AppPod, proxies: &[ProxyObservation]) -> Option<String> {
    let ip = pod.ip?;
    let mut open = Vec::new();
    for proxy in proxies {
        match &proxy.report {
            Err(e) => open.push(format!("proxy {} cannot be read: {e}", proxy.proxy)),
            Ok(report) => {
                let (in_flight, connections) = report
                    .endpoints
                    .iter()
                    .filter(|e| e.address.ip() == ip)
                    .fold((0, 0), |(r, c), e| (r + e.in_flight, c + e.connections));
                if in_flight + connections > 0 {
                    open.push(format!(
                        "proxy {}: {in_flight} in flight, {connections} connections",
                        proxy.proxy
                    ));
                }
            }
        }
    }
    (!open.is_empty()).then(|| open.join("; "))
}

/// Whether the front Service may switch to the proxies: every ready proxy is read and
/// lists every ready app pod (so the first request through a proxy finds the same pods
/// the Service reached directly), and `pods` holds as many ready pods as the Deployment
/// `deployment` counts (`pods_counted`): a ready pod not labelled or not seen yet is one nobody
/// checked, and switching would take its traffic away. `Err` says what is missing.
///
/// # Errors
/// Why not yet.
pub fn ready_to_switch(
    proxies_ready: i32,
    proxies_wanted: i32,
    deployment: &str,
    pods_counted: i32,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
) -> Result<(), String> {
    let seen = pods.iter().filter(|p| p.ready && !p.deleting).count();
    if usize::try_from(pods_counted).unwrap_or(0) > seen {
        return Err(format!(
            "{seen}/{pods_counted} ready pods of Deployment {deployment} are labelled and seen"
        ));
    }
    if proxies_ready < proxies_wanted || proxies.is_empty() {
        return Err(format!("{proxies_ready}/{proxies_wanted} proxies ready"));
    }
    for pod in pods.iter().filter(|p| p.ready && !p.deleting) {
        let Some(ip) = pod.ip else { continue };
        for proxy in proxies {
            match &proxy.report {
                Err(e) => return Err(format!("proxy {} cannot be read: {e}", proxy.proxy)),
                Ok(report) => {
                    if !report
                        .endpoints
                        .iter()
                        .any(|e| e.listed && e.ready && e.address.ip() == ip)
                    {
                        return Err(format!(
                            "proxy {} does not route to pod {} yet",
                            proxy.proxy, pod.name
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A count or percentage of `total`, rounded down (as the Deployment controller
/// resolves `maxUnavailable`).
pub fn resolve_count(value: &IntOrString, total: i32) -> i32 {
    match value {
        IntOrString::Int(n) => *n,
        IntOrString::String(text) => match text.strip_suffix('%') {
            Some(percent) => percent.parse::<i32>().unwrap_or(0) * total / 100,
            None => text.parse().unwrap_or(0),
        },
    }
}

/// The steps of giving an adopted Deployment and Service back, in order. The rollout to
/// the owner's own template runs while the proxies still carry the traffic (so the old
/// pods' drain gate still works), the Service goes back once no gated pod is left, and
/// the proxies go last: their own graceful shutdown moves the connections clients
/// still hold through them onto the Service's new endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveBack {
    /// Remove ballast's fields from the Deployment; its pods roll back to the owner's
    /// template, behind the proxies.
    ReleaseDeployment,
    /// Wait until no pod runs ballast's template any more.
    AwaitRollout,
    /// Point the front Service back at the pods it selected before.
    ReturnService,
    /// Wait until the front Service's endpoints are the app pods.
    AwaitService,
    /// Remove the finalizer: the proxies and ballast's other objects are deleted.
    Done,
}

impl GiveBack {
    /// The step to take, from what is observed. `released`: the Deployment carries no
    /// field of ballast's. `gated_pods`: pods still running with the drain gate.
    /// `service_returned`: the front Service selects the app pods again.
    /// `service_endpoints_are_pods`: its endpoints list app pods and no proxy.
    pub fn next(
        released: bool,
        gated_pods: usize,
        service_returned: bool,
        service_endpoints_are_pods: bool,
    ) -> Self {
        match (
            released,
            gated_pods,
            service_returned,
            service_endpoints_are_pods,
        ) {
            (false, _, _, _) => Self::ReleaseDeployment,
            (true, 1.., _, _) => Self::AwaitRollout,
            (true, 0, false, _) => Self::ReturnService,
            (true, 0, true, false) => Self::AwaitService,
            (true, 0, true, true) => Self::Done,
        }
    }

    /// For status: which step, of how many, doing what.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ReleaseDeployment => "step 1/4: removing ballast's fields from the Deployment",
            Self::AwaitRollout => {
                "step 2/4: the Deployment rolls back to its own template behind the proxies"
            }
            Self::ReturnService => "step 3/4: pointing the front Service back at the pods",
            Self::AwaitService => "step 4/4: waiting for the front Service to reach the pods",
            Self::Done => "done: removing the proxies",
        }
    }
}

// --- The front Service's switch: merge patches, pure. ---

/// Annotation on an adopted front Service: the BalancedService that switched it.
pub const ADOPTED_BY: &str = "ballast.dev/adopted-by";
/// Annotation on an adopted front Service: its selector and ports before the switch,
/// as JSON, to switch it back.
pub const ORIGINAL: &str = "ballast.dev/original";

/// The merge patch switching `service` to the proxies: its selector becomes the
/// proxies', each port's targetPort the proxy's client port; the values before are kept
/// in an annotation. `Err` when a port of the Service is not one of `spec.ports` (the
/// proxies would not serve it).
pub fn switch_patch(
    bs: &BalancedService,
    service: &Service,
    built: &Service,
) -> Result<Value, String> {
    let built_ports = built
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let spec = service.spec.clone().unwrap_or_default();
    // GKE Ingress: the NEG must lead to the proxies, with ballast's BackendConfig.
    let load_balancer = crate::build::load_balancer_annotations(bs);
    let mut original = match service.annotations().get(ORIGINAL) {
        // Already switched once (drift being undone): keep the first record.
        Some(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        None => json!({"selector": spec.selector, "ports": spec.ports}),
    };
    // The values of the annotations ballast sets, as they were before it first set
    // them (null: absent), for the give-back.
    for key in load_balancer.keys() {
        if original["annotations"].get(key).is_none() {
            original["annotations"][key] = json!(service.annotations().get(key));
        }
    }
    let mut selector: BTreeMap<String, Value> = spec
        .selector
        .unwrap_or_default()
        .into_keys()
        .map(|k| (k, Value::Null))
        .collect();
    for (k, v) in selector_labels(bs, "proxy") {
        selector.insert(k, Value::String(v));
    }
    let mut ports = Vec::new();
    for port in spec.ports.unwrap_or_default() {
        // The Service's port is the same as one of spec.ports by name, else by number.
        let served = built_ports
            .iter()
            .find(|p| p.name.is_some() && p.name == port.name)
            .or_else(|| built_ports.iter().find(|p| p.port == port.port));
        let Some(served) = served else {
            return Err(format!(
                "port {} ({}) of Service {} is not in spec.ports; add it there so the proxies serve it",
                port.port,
                port.name.clone().unwrap_or_default(),
                service.name_any()
            ));
        };
        let mut port = serde_json::to_value(&port).unwrap_or_default();
        port["targetPort"] = json!(served.target_port);
        ports.push(port);
    }
    let mut annotations = json!({
        ADOPTED_BY: bs.name_any(),
        ORIGINAL: original.to_string(),
    });
    for (key, value) in load_balancer {
        annotations[key] = json!(value);
    }
    Ok(json!({
        "metadata": {"annotations": annotations},
        "spec": {"selector": selector, "ports": ports},
    }))
}

/// True when `service` selects this BalancedService's proxies (switched, not drifted).
pub fn is_switched(bs: &BalancedService, service: &Service) -> bool {
    service.annotations().get(ADOPTED_BY) == Some(&bs.name_any())
        && crate::build::load_balancer_annotations(bs)
            .iter()
            .all(|(k, v)| service.annotations().get(k) == Some(v))
        && service
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| *s == selector_labels(bs, "proxy"))
}

/// The merge patch switching an adopted Service back to what it was.
pub fn return_patch(bs: &BalancedService, service: &Service) -> Value {
    let original: Value = service
        .annotations()
        .get(ORIGINAL)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null);
    let mut selector: BTreeMap<String, Value> = selector_labels(bs, "proxy")
        .into_keys()
        .map(|k| (k, Value::Null))
        .collect();
    if let Some(before) = original["selector"].as_object() {
        for (k, v) in before {
            selector.insert(k.clone(), v.clone());
        }
    }
    let mut annotations = json!({ADOPTED_BY: null, ORIGINAL: null});
    if let Some(before) = original["annotations"].as_object() {
        for (key, value) in before {
            annotations[key] = value.clone();
        }
    }
    json!({
        "metadata": {"annotations": annotations},
        "spec": {"selector": selector, "ports": original["ports"]},
    })
}

/// The merge patch leaving a front Service ballast created to the app: it selects the
/// Deployment's pods on their own ports and no longer has ballast's ownerReference, so
/// garbage collection keeps it for the clients that use its name.
pub fn release_patch(bs: &BalancedService, pods: &BTreeMap<String, String>) -> Value {
    let mut selector: BTreeMap<String, Value> = selector_labels(bs, "proxy")
        .into_keys()
        .map(|k| (k, Value::Null))
        .collect();
    for (k, v) in pods {
        selector.insert(k.clone(), Value::String(v.clone()));
    }
    let ports: Vec<Value> = bs
        .spec
        .ports
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "port": p.port,
                "protocol": "TCP",
                "targetPort": p.target_port.clone().unwrap_or(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p.port)),
            })
        })
        .collect();
    json!({
        "metadata": {"ownerReferences": null},
        "spec": {"selector": selector, "ports": ports},
    })
}

/// `selector` with `drop` set to null (a merge patch removing that key).
pub fn selector_with_nulls(drop: &str, selector: &BTreeMap<String, String>) -> Value {
    let mut out: BTreeMap<String, Value> = selector
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    out.insert(drop.to_owned(), Value::Null);
    json!(out)
}

#[cfg(test)]
mod tests;
