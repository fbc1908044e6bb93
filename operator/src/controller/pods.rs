//! The pod-facing half of a reconcile: what the app pods and the proxies report, and
//! the readiness gate written from it.

use ballast_api::BalancedService;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;

use super::{Context, ReconcileError};
use crate::gate::{self, Verdict};
use crate::observe::{AppPod, ProxyObservation, ROUTABLE_CONDITION};

/// The app pods, and the ready proxy pods (how many, and what each reports).
pub(super) async fn observe(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
) -> Result<(Vec<AppPod>, Vec<ProxyObservation>), ReconcileError> {
    ctx.caches.ready().await?;
    let app: Vec<AppPod> = ctx
        .caches
        .pods_of(bs, namespace, "app")
        .iter()
        .map(|p| AppPod::from_pod(p))
        .collect();
    let proxies = ctx.caches.proxy_pods(bs, namespace);
    let key = ObjectRef::from(bs);
    // With the proxy watch running its reading is at most a period old, and a change
    // since has already woken this reconcile; without it, read now.
    let watched = ctx
        .watching_proxies
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| ctx.readings.fresh(&key, &proxies))
        .flatten();
    let observations = match watched {
        Some(observations) => observations,
        None => {
            let observations = ctx.proxies.observe(&proxies).await;
            ctx.readings.record(key, &proxies, observations.clone());
            observations
        }
    };
    for o in &observations {
        if let Err(e) = &o.report {
            tracing::warn!(proxy = %o.proxy, error = %e, "reading a proxy failed");
        }
    }
    Ok((app, observations))
}

/// Writes the `ballast.dev/routable` condition of every pod whose verdict changed.
/// Returns the pods waiting for the proxies, with why.
pub(super) async fn set_gates(
    ctx: &Context,
    namespace: &str,
    pods: &[AppPod],
    proxies: &[ProxyObservation],
) -> Result<Vec<(String, String)>, ReconcileError> {
    let api = Api::<Pod>::namespaced(ctx.client.clone(), namespace);
    let mut waiting = Vec::new();
    for pod in pods {
        let verdict = gate::decide(pod, proxies);
        if let Verdict::NotRoutable(why) = &verdict {
            waiting.push((pod.name.clone(), why.clone()));
        }
        let Some((value, message)) = gate::change(pod, &verdict) else {
            continue;
        };
        // Strategic merge: conditions merge by type, so kubelet's own stay untouched
        // on every Kubernetes version.
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": ROUTABLE_CONDITION,
            "status": if value { "True" } else { "False" },
            "reason": if value { gate::REASON_LISTED } else { gate::REASON_WAITING },
            "message": message,
            "lastTransitionTime": Time(k8s_openapi::jiff::Timestamp::now()),
        }]}});
        match api
            .patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %pod.name, routable = value, %message, "readiness gate set")
            }
            // Deleted meanwhile: nothing to gate.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError::PatchPodStatus {
                    pod: pod.name.clone(),
                    source,
                });
            }
        }
    }
    Ok(waiting)
}
