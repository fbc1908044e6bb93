//! The readiness gate `ballast.dev/routable`: an app pod becomes Ready only once every
//! ready proxy replica has it in its endpoint set, so with `maxUnavailable: 0` the
//! Deployment controller never removes an old pod before the proxies can route to the
//! new one.
//!
//! The gate checks that each proxy *lists* the pod, not that it routes to it: while the
//! gate is False the pod is not Ready, its EndpointSlice entry is not ready, and no proxy
//! would ever route to it (waiting for that deadlocks). The flip to ready then reaches
//! the proxies through the same watch that already delivered the pod.

use crate::observe::{AppPod, ProxyObservation};

/// What the gate should say about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Set the condition True.
    Routable,
    /// Set the condition False, saying why.
    NotRoutable(String),
    /// Leave the condition as it is, for this reason.
    Keep(String),
}

/// Reason of the pod condition when True.
pub const REASON_LISTED: &str = "ListedByAllProxies";
/// Reason of the pod condition when False.
pub const REASON_WAITING: &str = "WaitingForProxies";

/// The verdict for `pod` given what every ready proxy replica reported.
///
/// * A pod being deleted is left alone (it is leaving; its drain is what matters now).
/// * When a proxy could not be read, or no proxy is ready, nothing is known: a pod that
///   is routable stays so (turning it False would take a serving pod out of every
///   Service for a monitoring failure), a pod that is not yet routable waits.
/// * Otherwise the pod is routable exactly when every proxy lists its IP, and turns
///   False again when a proxy has lost it.
pub fn decide(pod: &AppPod, proxies: &[ProxyObservation]) -> Verdict {
    if pod.deleting {
        return Verdict::Keep("the pod is terminating".to_owned());
    }
    let Some(ip) = pod.ip else {
        return wait_or_keep(pod, "the pod has no IP yet".to_owned());
    };
    if proxies.is_empty() {
        return wait_or_keep(pod, "no proxy replica is ready".to_owned());
    }
    let mut missing = Vec::new();
    for proxy in proxies {
        match &proxy.report {
            Err(e) => {
                return wait_or_keep(pod, format!("proxy {} cannot be read: {e}", proxy.proxy));
            }
            Ok(report) => {
                let listed = report
                    .endpoints
                    .iter()
                    .any(|e| e.listed && e.address.ip() == ip);
                if !listed {
                    missing.push(proxy.proxy.as_str());
                }
            }
        }
    }
    if missing.is_empty() {
        Verdict::Routable
    } else {
        Verdict::NotRoutable(format!(
            "{ip} not yet in the endpoints of proxy {}",
            missing.join(", ")
        ))
    }
}

/// [`decide`] for every pod with the readiness gate, opening at most `may_open` gates
/// that are closed now (a pod without the gate is left alone and counts for nothing):
/// the first rollout of an adopted Deployment opens one only as an old pod without
/// the drain gate has been retired and drained (see `adopt::guard`). `None`: no limit.
pub fn decide_all(
    pods: &[AppPod],
    proxies: &[ProxyObservation],
    mut may_open: Option<usize>,
) -> Vec<Verdict> {
    pods.iter()
        .map(|pod| {
            if !pod.gated {
                return Verdict::Keep("the pod has no readiness gate".to_owned());
            }
            let verdict = decide(pod, proxies);
            if verdict != Verdict::Routable || pod.routable == Some(true) {
                return verdict;
            }
            match &mut may_open {
                Some(0) => Verdict::NotRoutable(HELD_FOR_RETIREMENT.to_owned()),
                Some(n) => {
                    *n -= 1;
                    verdict
                }
                None => verdict,
            }
        })
        .collect()
}

/// Why a listed pod's gate stays closed during an adopted Deployment's first rollout.
pub const HELD_FOR_RETIREMENT: &str =
    "an old pod without the drain gate is taken out of the proxies and drained first";

fn wait_or_keep(pod: &AppPod, why: String) -> Verdict {
    if pod.routable == Some(true) {
        Verdict::Keep(why)
    } else {
        Verdict::NotRoutable(why)
    }
}

/// The condition value to write for `verdict`, when it differs from what the pod has.
/// A False condition is (re)written when its message would change, so `kubectl describe
/// pod` says what the pod is waiting for.
pub fn change(pod: &AppPod, verdict: &Verdict) -> Option<(bool, String)> {
    match verdict {
        Verdict::Keep(_) => None,
        Verdict::Routable => (pod.routable != Some(true))
            .then(|| (true, "every ready proxy replica lists this pod".to_owned())),
        Verdict::NotRoutable(why) => (pod.routable != Some(false)
            || pod.routable_message.as_deref() != Some(why.as_str()))
        .then(|| (false, why.clone())),
    }
}

#[cfg(test)]
mod tests;
