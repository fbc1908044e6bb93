//! The app Deployment: the user's pod template with ballast's labels, generated
//! probes, grace period and drain gate.

use ballast_api::settings::AfterDrain;
use ballast_api::spec::{AppProtocol, ProbeScheme, RolloutSpec};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ExecAction, GRPCAction, HTTPGetAction, Lifecycle, LifecycleHandler, PodSpec,
    PodTemplateSpec, Probe, SleepAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

use super::drain_gate::{DRAIN_BINARY, add_routable_gate, apply_drain_gate};
use super::{
    BACKEND_LABEL, BuildContext, REVISION_LABEL, SERVICE_LABEL, meta, selector_labels,
    template_revision,
};
use crate::validate::ValidatedSpec;

/// The container that serves the proxied port: the one declaring the target port, or
/// the first.
fn serving_container(pod: &PodSpec, target: &IntOrString) -> usize {
    pod.containers
        .iter()
        .position(|c| {
            c.ports.iter().flatten().any(|p| match target {
                IntOrString::Int(n) => p.container_port == *n,
                IntOrString::String(name) => p.name.as_deref() == Some(name),
            })
        })
        .unwrap_or(0)
}

/// Readiness and startup probes from `spec.probes`, for a container that has neither.
fn generated_probes(v: &ValidatedSpec<'_>) -> (Probe, Probe) {
    let probes = &v.bs.spec.probes;
    let port = v.probe_port.clone();
    let base = match v.probe_protocol {
        AppProtocol::Grpc => Probe {
            grpc: Some(GRPCAction {
                // A gRPC probe takes a number only; a name means the container's port.
                port: v.probe_port_number,
                ..GRPCAction::default()
            }),
            ..Probe::default()
        },
        _ => Probe {
            http_get: Some(HTTPGetAction {
                path: Some(probes.path.clone()),
                port,
                scheme: Some(match probes.scheme {
                    ProbeScheme::Http => "HTTP".to_owned(),
                    ProbeScheme::Https => "HTTPS".to_owned(),
                }),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        },
    };
    let readiness = Probe {
        period_seconds: Some(probes.period_seconds),
        timeout_seconds: Some(probes.timeout_seconds),
        failure_threshold: Some(probes.failure_threshold),
        success_threshold: Some(1),
        ..base.clone()
    };
    // The startup probe covers slow starts, so readiness can stay fast.
    let startup = Probe {
        period_seconds: Some(probes.period_seconds),
        timeout_seconds: Some(probes.timeout_seconds),
        failure_threshold: Some(
            (probes.startup_budget_seconds + probes.period_seconds - 1) / probes.period_seconds,
        ),
        success_threshold: Some(1),
        ..base
    };
    (readiness, startup)
}

/// Readiness probe periods longer than this slow every rollout down.
pub const SLOW_PROBE_PERIOD_SECONDS: i32 = 10;

/// Containers whose own readiness probe is so slow it delays rollouts.
pub fn slow_probes(v: &ValidatedSpec<'_>) -> Vec<String> {
    let containers = v
        .template
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    containers
        .iter()
        .filter(|c| {
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.period_seconds)
                .unwrap_or(10)
                > SLOW_PROBE_PERIOD_SECONDS
        })
        .map(|c| c.name.clone())
        .collect()
}

/// The user's app: `spec.template` under ballast's rollout strategy.
pub(super) fn app_deployment(v: &ValidatedSpec<'_>, ctx: &BuildContext) -> Deployment {
    let spec = &v.bs.spec;
    if let Some(adopted) = v.adopted {
        return adopted_deployment(v, ctx, adopted);
    }
    let mut template = v.template.clone();
    let revision = template_revision(v.template);
    let metadata = template.metadata.get_or_insert_default();
    let labels = metadata.labels.get_or_insert_default();
    labels.extend(selector_labels(v.bs, "app"));
    labels.insert(REVISION_LABEL.to_owned(), revision);
    let pod = template.spec.get_or_insert_default();
    let serving = serving_container(pod, &v.serving_port);
    if let Some(container) = pod.containers.get_mut(serving)
        && container.readiness_probe.is_none()
        && container.startup_probe.is_none()
    {
        let (readiness, startup) = generated_probes(v);
        container.readiness_probe = Some(readiness);
        container.startup_probe = Some(startup);
    }
    pod.termination_grace_period_seconds = Some(
        i64::from(spec.rollout.drain_timeout_seconds)
            + i64::from(spec.rollout.shutdown_grace_seconds),
    );
    apply_drain_gate(v, ctx, pod, serving);
    add_routable_gate(pod);

    let selector = selector_labels(v.bs, "app");
    Deployment {
        metadata: meta(v, v.name.to_owned()),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(strategy(&spec.rollout)),
            min_ready_seconds: Some(min_ready_seconds(&spec.rollout)),
            progress_deadline_seconds: Some(spec.rollout.progress_deadline_seconds),
            revision_history_limit: Some(10),
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// What ballast applies to an adopted Deployment, under its own field manager: its
/// labels, the drain gate and readiness gate, generated probes where the serving
/// container has none, the rolling-update strategy, `minReadySeconds` and the grace
/// period. Nothing else: no `replicas` (the owner's or its autoscaler's), no selector,
/// no image. A container appears by name only, with ballast's fields; server-side apply
/// merges it into the owner's container of that name.
///
/// The live template already holds what ballast applied before, so its preStop and
/// probes are told apart from the owner's: a preStop running `ballast-drain` is ballast's
/// (the owner's own hook is what it chains), probes equal to the generated ones are
/// ballast's.
fn adopted_deployment(v: &ValidatedSpec<'_>, ctx: &BuildContext, live: &Deployment) -> Deployment {
    let spec = &v.bs.spec;
    let live_pod = v.template.spec.clone().unwrap_or_default();
    let serving = serving_container(&live_pod, &v.serving_port);
    let mut pod = PodSpec {
        containers: Vec::new(),
        readiness_gates: live_pod.readiness_gates.clone(),
        termination_grace_period_seconds: Some(
            i64::from(spec.rollout.drain_timeout_seconds)
                + i64::from(spec.rollout.shutdown_grace_seconds),
        ),
        ..PodSpec::default()
    };
    if let Some(own) = live_pod.containers.get(serving) {
        let mut container = Container {
            name: own.name.clone(),
            lifecycle: owners_pre_stop(own).map(|pre_stop| Lifecycle {
                pre_stop: Some(pre_stop),
                ..Lifecycle::default()
            }),
            ..Container::default()
        };
        let (readiness, startup) = generated_probes(v);
        let generated = |probe: &Option<Probe>, ours: &Probe| probe.as_ref() == Some(ours);
        let owners_probes = (own.readiness_probe.is_some()
            && !generated(&own.readiness_probe, &readiness))
            || (own.startup_probe.is_some() && !generated(&own.startup_probe, &startup));
        if !owners_probes {
            container.readiness_probe = Some(readiness);
            container.startup_probe = Some(startup);
        }
        pod.containers.push(container);
    }
    apply_drain_gate(v, ctx, &mut pod, 0);
    add_routable_gate(&mut pod);
    let mut labels = selector_labels(v.bs, "app");
    labels.insert(BACKEND_LABEL.to_owned(), BACKEND_SERVING.to_owned());
    let mut metadata = meta(v, live.metadata.name.clone().unwrap_or_default());
    // Never an ownerReference: deleting the BalancedService must not delete the
    // Deployment (the finalizer gives it back instead).
    metadata.owner_references = None;
    // Only ballast's own label: the app.kubernetes.io ones are the owner's (Helm checks
    // `managed-by: Helm` before every upgrade, and a forced apply would take them over).
    metadata.labels = Some(BTreeMap::from([(
        SERVICE_LABEL.to_owned(),
        v.name.to_owned(),
    )]));
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            strategy: Some(strategy(&spec.rollout)),
            min_ready_seconds: Some(min_ready_seconds(&spec.rollout)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            // The apply body must carry the selector's type; server-side apply keeps
            // the owner's value (an equal value is co-owned, never changed).
            selector: live
                .spec
                .as_ref()
                .map(|s| s.selector.clone())
                .unwrap_or_default(),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The rolling update `spec.rollout` asks for.
fn strategy(rollout: &RolloutSpec) -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".to_owned()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(rollout.max_surge.clone()),
            max_unavailable: Some(rollout.max_unavailable.clone()),
        }),
    }
}

/// A new pod counts as available once its slow-start ramp is over, so the old pod it
/// replaces leaves only when the new one takes its full share.
fn min_ready_seconds(rollout: &RolloutSpec) -> i32 {
    rollout.min_ready_seconds.max(rollout.warmup_seconds)
}

/// Value of [`BACKEND_LABEL`] on a pod the proxies balance over.
pub const BACKEND_SERVING: &str = "true";

/// The owner's own preStop hook of `container`: the live one, or the one ballast's
/// drain command chains.
fn owners_pre_stop(container: &Container) -> Option<LifecycleHandler> {
    let live = container.lifecycle.as_ref()?.pre_stop.as_ref()?;
    let command = live.exec.as_ref().and_then(|e| e.command.as_deref());
    match command.and_then(|c| AfterDrain::chained_in(c, DRAIN_BINARY)) {
        None => Some(live.clone()),
        Some(AfterDrain::Nothing) => None,
        Some(AfterDrain::Exec(command)) => Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(command),
            }),
            ..LifecycleHandler::default()
        }),
        Some(AfterDrain::Sleep(pause)) => Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: i64::try_from(pause.as_secs()).unwrap_or(i64::MAX),
            }),
            ..LifecycleHandler::default()
        }),
    }
}
