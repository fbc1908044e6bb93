//! The app Deployment: the user's pod template with ballast's labels, generated
//! probes, grace period and drain gate.

use ballast_api::spec::{AppProtocol, ProbeScheme};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{GRPCAction, HTTPGetAction, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::drain_gate::{add_routable_gate, apply_drain_gate};
use super::{BuildContext, REVISION_LABEL, meta, selector_labels, template_revision};
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
    let containers =
        v.bs.spec
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
    let mut template = spec.template.clone();
    let revision = template_revision(&spec.template);
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
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(spec.rollout.max_surge.clone()),
                    max_unavailable: Some(spec.rollout.max_unavailable.clone()),
                }),
            }),
            // A new pod counts as available once its slow-start ramp is over, so the
            // old pod it replaces leaves only when the new one takes its full share.
            min_ready_seconds: Some(
                spec.rollout
                    .min_ready_seconds
                    .max(spec.rollout.warmup_seconds),
            ),
            progress_deadline_seconds: Some(spec.rollout.progress_deadline_seconds),
            revision_history_limit: Some(10),
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}
