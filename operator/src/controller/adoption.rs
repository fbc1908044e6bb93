//! The I/O of adopting a Deployment (`spec.workloadRef`): reading it, the finalizer,
//! switching the user's front Service to the proxies and back, and the give-back steps
//! on deletion. The decisions are `crate::adopt`'s.

use ballast_api::BalancedService;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::{Context, ReconcileError};
use crate::adopt::{self, ADOPTED_BY, GiveBack, release_patch, return_patch, selector_with_nulls};
use crate::build::{MANAGER, deployment_match_labels};

/// Finalizer of a BalancedService that adopted a Deployment: deleting it gives the
/// Deployment and the front Service back first.
pub const FINALIZER: &str = "ballast.dev/give-back";
/// What the adoption looks like, for the `Adopted` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoption {
    /// The condition's status.
    pub healthy: bool,
    /// Its reason.
    pub reason: &'static str,
    /// Its message.
    pub message: String,
}

fn read_error(kind: &'static str, name: &str) -> impl FnOnce(kube::Error) -> ReconcileError {
    let name = name.to_owned();
    move |source| ReconcileError::ReadObject { kind, name, source }
}

/// The Deployment `name`, if it exists.
pub(super) async fn read_deployment(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Deployment>, ReconcileError> {
    Api::<Deployment>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(read_error("Deployment", name))
}

/// The Service `name`, if it exists.
pub(super) async fn read_service(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Service>, ReconcileError> {
    Api::<Service>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(read_error("Service", name))
}

/// Adds the give-back finalizer when missing.
pub(super) async fn ensure_finalizer(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
) -> Result<(), ReconcileError> {
    if bs.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = bs.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    patch_finalizers(ctx, bs, namespace, finalizers).await
}

async fn patch_finalizers(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    finalizers: Vec<String>,
) -> Result<(), ReconcileError> {
    // The resourceVersion makes it a compare-and-swap: another writer's finalizer is
    // never lost (a conflict is retried with the new list).
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": bs.resource_version(),
    }});
    super::merge_patch(ctx, bs, namespace, &patch)
        .await
        .map_err(ReconcileError::Finalizer)
}

/// Whose the front Service is, for an adopting BalancedService.
pub(super) enum Front {
    /// Absent, or ballast's own (carries the ownerReference): applied as built.
    Ours,
    /// The user's, already switched to the proxies by this BalancedService.
    Switched(Box<Service>),
    /// The user's, not switched yet.
    Theirs(Box<Service>),
}

pub(super) fn front_of(bs: &BalancedService, service: Option<Service>) -> Front {
    let uid = bs.metadata.uid.as_deref().unwrap_or_default();
    match service {
        None => Front::Ours,
        Some(s) if s.owner_references().iter().any(|o| o.uid == uid) => Front::Ours,
        Some(s) if s.annotations().get(ADOPTED_BY) == Some(&bs.name_any()) => {
            Front::Switched(Box::new(s))
        }
        Some(s) => Front::Theirs(Box::new(s)),
    }
}

pub(super) async fn patch_service(
    ctx: &Context,
    namespace: &str,
    name: &str,
    patch: &Value,
) -> Result<(), ReconcileError> {
    Api::<Service>::namespaced(ctx.client.clone(), namespace)
        .patch(
            name,
            &PatchParams {
                field_manager: Some(MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(patch),
        )
        .await
        .map_err(|source| ReconcileError::PatchService {
            name: name.to_owned(),
            source,
        })?;
    Ok(())
}

/// True while the Deployment still carries fields ballast applied.
fn carries_ballast_fields(deployment: &Deployment) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|f| f.manager.as_deref() == Some(MANAGER) && f.operation.as_deref() == Some("Apply"))
}

/// One give-back step of a BalancedService being deleted. Returns the status message
/// of the step, or `None` once the finalizer is removed.
pub(super) async fn give_back(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    deployment: Option<&Deployment>,
) -> Result<Option<Adoption>, ReconcileError> {
    if !bs.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(None);
    }
    let front_name = bs
        .spec
        .service
        .name
        .clone()
        .unwrap_or_else(|| bs.name_any());
    let service = read_service(ctx, namespace, &front_name).await?;
    let own_selector = service
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.clone());
    let front = front_of(bs, service);
    let released = deployment.is_none_or(|d| !carries_ballast_fields(d));
    ctx.caches.ready().await?;
    let gated = ctx
        .caches
        .pods_of(bs, namespace, "app")
        .iter()
        .map(|p| crate::observe::AppPod::from_pod(p))
        .filter(|p| p.gated)
        .count();
    let pods_selector = deployment.map(deployment_match_labels).unwrap_or_default();
    // The user's Service must reach the app pods before the proxies go; with no app pod
    // ready there is nothing it could reach, and waiting would hold the deletion
    // forever. A front Service ballast created is left behind pointing at the pods, for
    // the clients that use its name; with none there is nothing to give back.
    let (returned, reaches_pods) = match (&front, &own_selector) {
        (Front::Switched(_), _) => (false, false),
        (Front::Ours, None) => (true, true),
        (Front::Ours, Some(selector)) if *selector != pods_selector => (false, false),
        (Front::Ours | Front::Theirs(_), _) => {
            let pods_ready = deployment
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let reaches = service_reaches_pods(ctx, bs, namespace, &front_name).await?;
            (
                true,
                reaches.no_proxy && (reaches.pods > 0 || pods_ready == 0),
            )
        }
    };
    let step = GiveBack::next(released, gated, returned, reaches_pods);
    tracing::info!(step = step.describe(), "giving the adopted Deployment back");
    match step {
        GiveBack::ReleaseDeployment => {
            if let Some(deployment) = deployment {
                // The backends Service first selects every pod of the Deployment, so the
                // pods of the owner's template (without ballast's labels) are balanced too.
                let backends = format!("{}-backends", bs.name_any());
                let patch = json!({"spec": {"selector": selector_with_nulls(
                    crate::build::BACKEND_LABEL, &pods_selector)}});
                patch_service(ctx, namespace, &backends, &patch).await?;
                release_deployment(ctx, namespace, deployment).await?;
            }
        }
        GiveBack::ReturnService => match &front {
            Front::Switched(service) => {
                patch_service(ctx, namespace, &front_name, &return_patch(bs, service)).await?;
            }
            Front::Ours => {
                let patch = release_patch(bs, &pods_selector);
                patch_service(ctx, namespace, &front_name, &patch).await?;
            }
            Front::Theirs(_) => {}
        },
        GiveBack::AwaitRollout | GiveBack::AwaitService => {}
        GiveBack::Done => {
            let finalizers = bs
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            patch_finalizers(ctx, bs, namespace, finalizers).await?;
            return Ok(None);
        }
    }
    let detail = match step {
        GiveBack::AwaitRollout => format!(" ({gated} pods with the drain gate left)"),
        _ => String::new(),
    };
    Ok(Some(Adoption {
        healthy: false,
        reason: "GivingBack",
        message: format!("{}{detail}", step.describe()),
    }))
}

/// Removes every field ballast applied to the Deployment: an apply of an empty body
/// under ballast's field manager drops what only it owned (the owner's own values of
/// shared fields stay). The Deployment rolls back to its owner's template.
async fn release_deployment(
    ctx: &Context,
    namespace: &str,
    deployment: &Deployment,
) -> Result<(), ReconcileError> {
    let name = deployment.name_any();
    let empty = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}});
    Api::<Deployment>::namespaced(ctx.client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&empty),
        )
        .await
        .map_err(|source| ReconcileError::ReleaseDeployment { name, source })?;
    Ok(())
}

/// What the front Service's EndpointSlices list.
struct Reach {
    /// No endpoint is a proxy pod (or anything but a pod).
    no_proxy: bool,
    /// How many endpoints are pods that are not proxies.
    pods: usize,
}

/// What the front Service's endpoints are: app pods, proxies, or nothing.
async fn service_reaches_pods(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    front_name: &str,
) -> Result<Reach, ReconcileError> {
    let slices = Api::<EndpointSlice>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={front_name}")))
        .await
        .map_err(read_error("EndpointSlice", front_name))?;
    let proxies: Vec<String> = ctx
        .caches
        .pods_of(bs, namespace, "proxy")
        .iter()
        .map(|p| p.name_any())
        .collect();
    let targets: Vec<(String, String)> = slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter_map(|e| e.target_ref.as_ref())
        .map(|r| {
            (
                r.kind.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let is_app_pod = |(kind, name): &&(String, String)| kind == "Pod" && !proxies.contains(name);
    let pods = targets.iter().filter(is_app_pod).count();
    Ok(Reach {
        no_proxy: pods == targets.len(),
        pods,
    })
}

/// The adoption's state for its condition, from what converge saw.
pub(super) fn adopted(
    deployment: &str,
    front: &str,
    switched: Result<(), String>,
    guard: &adopt::Guard,
    old_pods: usize,
) -> Adoption {
    match switched {
        Err(why) => Adoption {
            healthy: false,
            reason: "WaitingForProxies",
            message: format!(
                "Deployment {deployment} adopted; Service {front} switches to the proxies once {why}"
            ),
        },
        Ok(()) if old_pods > 0 => Adoption {
            healthy: true,
            reason: "FirstRollout",
            message: format!(
                "Deployment {deployment} and Service {front} adopted; {old_pods} pods started before the adoption are replaced one by one, each retired from the proxies and drained before it is deleted{}",
                guard
                    .draining
                    .first()
                    .map(|(pod, what)| format!(" (draining {pod}: {what})"))
                    .unwrap_or_default()
            ),
        },
        Ok(()) => Adoption {
            healthy: true,
            reason: "Adopted",
            message: format!(
                "Deployment {deployment} and Service {front} adopted; every pod runs with the drain gate"
            ),
        },
    }
}
