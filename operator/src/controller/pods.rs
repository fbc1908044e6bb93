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
    may_open: Option<usize>,
) -> Result<Vec<(String, String)>, ReconcileError> {
    let api = Api::<Pod>::namespaced(ctx.client.clone(), namespace);
    let mut waiting = Vec::new();
    // A pod without the readiness gate (an adopted Deployment's, started before the
    // adoption) has no use for the condition; counting it would also spend the first
    // rollout's allowance of gates on a pod that has none.
    let gated: Vec<AppPod> = pods.iter().filter(|p| p.gated).cloned().collect();
    for (pod, verdict) in gated
        .iter()
        .zip(gate::decide_all(&gated, proxies, may_open))
    {
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

/// Gives the adopted Deployment's pods that predate the adoption the labels the
/// operator and the backends Service select them by. Listed (by the Deployment's own
/// selector) only while the caches hold fewer pods than the Deployment has.
pub(super) async fn label_adopted_pods(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    deployment: &k8s_openapi::api::apps::v1::Deployment,
    cached: usize,
) -> Result<(), ReconcileError> {
    let replicas = deployment
        .status
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    if usize::try_from(replicas).unwrap_or(0) <= cached {
        return Ok(());
    }
    let selector = crate::build::deployment_match_labels(deployment);
    let query: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let api = Api::<Pod>::namespaced(ctx.client.clone(), namespace);
    let pods = api
        .list(&kube::api::ListParams::default().labels(&query.join(",")))
        .await
        .map_err(|source| ReconcileError::ReadObject {
            kind: "Pod",
            name: query.join(","),
            source,
        })?;
    let mut labels = crate::build::selector_labels(bs, "app");
    labels.insert(
        crate::build::BACKEND_LABEL.to_owned(),
        crate::build::BACKEND_SERVING.to_owned(),
    );
    for pod in pods.items.iter().filter(|p| {
        p.metadata.deletion_timestamp.is_none()
            && !p
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(crate::build::BACKEND_LABEL))
    }) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({"metadata": {"labels": labels}});
        patch_pod(&api, &name, &patch).await?;
        tracing::info!(pod = %name, "adopted pod labelled");
    }
    Ok(())
}

/// Takes `pod` out of the proxies' rotation and first in line for deletion (see
/// `adopt`).
pub(super) async fn retire(
    ctx: &Context,
    namespace: &str,
    pod: &str,
    now: i64,
) -> Result<(), ReconcileError> {
    let api = Api::<Pod>::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({"metadata": {
        "labels": {crate::build::BACKEND_LABEL: format!("{}{now}", crate::adopt::RETIRED_PREFIX)},
        "annotations": {crate::adopt::DELETION_COST_ANNOTATION: crate::adopt::RETIRED_DELETION_COST},
    }});
    patch_pod(&api, pod, &patch).await?;
    tracing::info!(%pod, "old pod retired from the proxies before its deletion");
    Ok(())
}

async fn patch_pod(
    api: &Api<Pod>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), ReconcileError> {
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Deleted meanwhile.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::PatchPod {
            pod: name.to_owned(),
            source,
        }),
    }
}
