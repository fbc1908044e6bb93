//! The apply step: every owned object is checked to be ballast's (or absent), then
//! server-side applied in order, skipping bodies the watches show already in place.

use ballast_api::BalancedService;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::sync::PoisonError;

use super::{Context, ReconcileError};
use crate::build::{MANAGER, OwnedObjects};
use crate::status::{Blocked, Observed};

/// The first owned object that exists without this BalancedService's ownerReference,
/// as a [`Blocked::Conflict`]. Objects confirmed before are not read again, so a
/// steady reconcile costs no reads.
pub(super) async fn check_ownership(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    objects: &OwnedObjects,
    plan: &ApplyPlan,
) -> Result<Option<Blocked>, ReconcileError> {
    let uid = bs.metadata.uid.clone().unwrap_or_default();
    let known = ctx
        .confirmed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&uid)
        .cloned()
        .unwrap_or_default();
    let mut confirmed = known.clone();
    macro_rules! check {
        ($object:expr) => {
            if let Some(conflict) = check_one(
                &ctx.client,
                namespace,
                &uid,
                &known,
                &mut confirmed,
                $object,
            )
            .await?
            {
                return Ok(Some(conflict));
            }
        };
    }
    check!(&objects.proxy_service_account);
    check!(&objects.proxy_role);
    check!(&objects.proxy_role_binding);
    check!(&objects.backends_service);
    check!(&objects.proxy_admin_service);
    check!(&objects.proxy_deployment);
    if plan.front_service {
        check!(&objects.front_service);
    }
    if plan.app_deployment && bs.spec.workload_ref.is_none() {
        check!(&objects.app_deployment);
    }
    if let Some(pdb) = &objects.app_pdb {
        check!(pdb);
    }
    check!(&objects.proxy_pdb);
    if let Some(policy) = &objects.proxy_network_policy {
        check!(policy);
    }
    if let Some(policy) = &objects.app_network_policy {
        check!(policy);
    }
    let lb = &objects.load_balancer;
    if let Some(config) = &lb.backend_config {
        check!(config);
    }
    if let Some(policy) = &lb.backend_policy {
        check!(policy);
    }
    if let Some(policy) = &lb.health_check_policy {
        check!(policy);
    }
    if confirmed.len() != known.len() {
        ctx.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid, confirmed);
    }
    Ok(None)
}

async fn check_one<K>(
    client: &Client,
    namespace: &str,
    uid: &str,
    known: &BTreeSet<(&'static str, String)>,
    confirmed: &mut BTreeSet<(&'static str, String)>,
    object: &K,
) -> Result<Option<Blocked>, ReconcileError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let kind = kind_name::<K>();
    let name = object.meta().name.clone().unwrap_or_default();
    let key = (kind, name.clone());
    if known.contains(&key) {
        return Ok(None);
    }
    let existing = Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(|source| ReconcileError::ReadObject {
            kind,
            name: name.clone(),
            source,
        })?;
    match existing.as_ref().map(|o| owner_of(o.meta(), uid)) {
        None | Some(Ownership::Ours) => {
            confirmed.insert(key);
            Ok(None)
        }
        Some(Ownership::Other(owner)) => Ok(Some(Blocked::Conflict { kind, name, owner })),
    }
}

/// Whose an existing object is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ownership {
    /// It carries the BalancedService's ownerReference.
    Ours,
    /// Somebody else's, described for the status message.
    Other(String),
}

impl Ownership {
    /// For a status message.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Ours => "this BalancedService's".to_owned(),
            Self::Other(who) => who.clone(),
        }
    }
}

pub(super) fn owner_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    uid: &str,
) -> Ownership {
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    if owners.iter().any(|o| o.uid == uid) {
        return Ownership::Ours;
    }
    if let Some(controller) = owners.iter().find(|o| o.controller == Some(true)) {
        return Ownership::Other(format!(
            "controlled by {} {}",
            controller.kind, controller.name
        ));
    }
    let managers: BTreeSet<&str> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.as_deref())
        .collect();
    Ownership::Other(if managers.is_empty() {
        "no owner".to_owned()
    } else {
        format!(
            "written by {}",
            managers.into_iter().collect::<Vec<_>>().join(", ")
        )
    })
}

/// Applies every owned object in order: the proxies' identity and permissions first
/// (they are needed when the proxy starts), the backends Service before the proxies
/// (its EndpointSlices are what they watch), the proxies before the front Service and
/// the app (so traffic and new pods always find a proxy), budgets last. The first
/// refusal stops it, as [`Blocked::ApplyFailed`] with the API server's message.
/// Which of the objects a reconcile applies: all of them, except while a Deployment is
/// being adopted (its front Service is switched, not applied, when it is the user's; its
/// Deployment gets ballast's fields only once the traffic goes through the proxies).
#[derive(Clone, Copy, Debug)]
pub(super) struct ApplyPlan {
    /// Apply the front Service (ballast's own).
    pub front_service: bool,
    /// Apply the app Deployment (or ballast's fields of the adopted one).
    pub app_deployment: bool,
}

pub(super) async fn apply(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    objects: &OwnedObjects,
    plan: &ApplyPlan,
) -> Result<Observed, Blocked> {
    let owned = &ctx.caches.owned;
    let target = Target {
        ctx,
        owner: ObjectRef::from(bs),
        namespace,
    };
    target
        .apply(&owned.service_accounts, &objects.proxy_service_account)
        .await?;
    target.apply(&owned.roles, &objects.proxy_role).await?;
    target
        .apply(&owned.role_bindings, &objects.proxy_role_binding)
        .await?;
    target
        .apply(&owned.services, &objects.backends_service)
        .await?;
    target
        .apply(&owned.services, &objects.proxy_admin_service)
        .await?;
    let proxy = target
        .apply(&owned.deployments, &objects.proxy_deployment)
        .await?;
    if plan.front_service {
        target
            .apply(&owned.services, &objects.front_service)
            .await?;
    }
    let app = if plan.app_deployment {
        Some(
            target
                .apply(&owned.deployments, &objects.app_deployment)
                .await?,
        )
    } else {
        None
    };
    if let Some(pdb) = &objects.app_pdb {
        target.apply(&owned.budgets, pdb).await?;
    }
    target.apply(&owned.budgets, &objects.proxy_pdb).await?;
    for policy in [&objects.proxy_network_policy, &objects.app_network_policy]
        .into_iter()
        .flatten()
    {
        target.apply(&owned.network_policies, policy).await?;
    }
    // GKE's kinds exist only on GKE, so they are not watched: applied when their body
    // changes (an apply on a cluster without them fails with the API server's answer).
    let lb = &objects.load_balancer;
    if let Some(config) = &lb.backend_config {
        target.apply_unwatched(config).await?;
    }
    if let Some(policy) = &lb.backend_policy {
        target.apply_unwatched(policy).await?;
    }
    if let Some(policy) = &lb.health_check_policy {
        target.apply_unwatched(policy).await?;
    }
    Ok(Observed {
        app,
        proxy: Some(proxy),
        ..Observed::default()
    })
}

/// Applies the app Deployment alone: ballast's fields of an adopted Deployment, once
/// its front Service has been switched to the proxies after the other objects were
/// applied.
pub(super) async fn apply_app_deployment(
    ctx: &Context,
    bs: &BalancedService,
    namespace: &str,
    objects: &OwnedObjects,
) -> Result<k8s_openapi::api::apps::v1::Deployment, Blocked> {
    Target {
        ctx,
        owner: ObjectRef::from(bs),
        namespace,
    }
    .apply(&ctx.caches.owned.deployments, &objects.app_deployment)
    .await
}

/// Where owned objects are applied: one BalancedService's namespace.
struct Target<'a> {
    ctx: &'a Context,
    owner: ObjectRef<BalancedService>,
    namespace: &'a str,
}

impl Target<'_> {
    /// Server-side applies `object`, unless the same body was applied before and the
    /// object, as the watch shows it, is still what the API server answered then
    /// (same generation or version, labels, annotations, owners): a steady reconcile
    /// then writes nothing. Returns the object as the API server has it.
    async fn apply<K>(&self, live: &Store<K>, object: &K) -> Result<K, Blocked>
    where
        K: Applied,
    {
        let kind = kind_name::<K>();
        let name = object.meta().name.clone().unwrap_or_default();
        let desired = body_hash(object);
        let key = (kind, name.clone());
        let current = live.get(&ObjectRef::new(&name).within(self.namespace));
        if let (Some(current), Some(last)) = (&current, self.last_applied(&key))
            && last == (desired, fingerprint(current.meta()))
        {
            return Ok(K::clone(current));
        }
        let applied = self.patch(object, kind, &name).await?;
        self.remember(key, (desired, fingerprint(applied.meta())));
        Ok(applied)
    }

    /// Server-side applies `object`, a kind the operator does not watch, unless the
    /// same body was the last one applied.
    async fn apply_unwatched<K>(&self, object: &K) -> Result<(), Blocked>
    where
        K: Applied,
    {
        let kind = kind_name::<K>();
        let name = object.meta().name.clone().unwrap_or_default();
        let desired = body_hash(object);
        let key = (kind, name.clone());
        if self
            .last_applied(&key)
            .is_some_and(|(body, _)| body == desired)
        {
            return Ok(());
        }
        self.patch(object, kind, &name).await?;
        self.remember(key, (desired, 0));
        Ok(())
    }

    async fn patch<K>(&self, object: &K, kind: &'static str, name: &str) -> Result<K, Blocked>
    where
        K: Applied,
    {
        Api::<K>::namespaced(self.ctx.client.clone(), self.namespace)
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(|source| {
                let message = match &source {
                    kube::Error::Api(status) => status.message.clone(),
                    other => crate::error_chain(other),
                };
                tracing::warn!(kind, object = %name, error = %message, "apply refused");
                Blocked::ApplyFailed {
                    kind,
                    name: name.to_owned(),
                    message,
                }
            })
    }

    /// The body hash and fingerprint of the last apply of `key`.
    fn last_applied(&self, key: &(&'static str, String)) -> Option<(u64, u64)> {
        self.ctx
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&self.owner)
            .and_then(|m| m.get(key).copied())
    }

    fn remember(&self, key: (&'static str, String), applied: (u64, u64)) {
        self.ctx
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(self.owner.clone())
            .or_default()
            .insert(key, applied);
    }
}

/// What the apply step writes: a namespaced kind, sent and read back as JSON.
trait Applied:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Serialize
    + DeserializeOwned
    + Clone
    + std::fmt::Debug
{
}

impl<K> Applied for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
{
}

/// A hash of what an apply would send.
fn body_hash<K: Serialize>(object: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(object)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// What of an object's metadata changes when anybody changes what ballast applied: the
/// generation (its spec) where the kind has one, else the resourceVersion, and the
/// labels, annotations and ownerReferences. A status update (a Deployment rolling, a
/// budget counting healthy pods) leaves it alone.
fn fingerprint(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match meta.generation {
        Some(generation) => generation.hash(&mut hasher),
        None => meta.resource_version.hash(&mut hasher),
    }
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    serde_json::to_vec(&meta.owner_references)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Deployment" => "Deployment",
        "Service" => "Service",
        "ServiceAccount" => "ServiceAccount",
        "Role" => "Role",
        "RoleBinding" => "RoleBinding",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "NetworkPolicy" => "NetworkPolicy",
        "BackendConfig" => "BackendConfig",
        "GCPBackendPolicy" => "GCPBackendPolicy",
        "HealthCheckPolicy" => "HealthCheckPolicy",
        _ => "object",
    }
}
