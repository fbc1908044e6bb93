//! The drain gate in front of an app pod's termination: the init container installing
//! `ballast-drain`, the serving container's preStop running it, and the readiness gate
//! the operator sets once every proxy lists the pod.

use ballast_api::settings::{AfterDrain, DrainSettings};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, ExecAction, LifecycleHandler, PodReadinessGate, PodSpec,
    ResourceRequirements, SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;
use std::time::Duration;

use super::{BuildContext, proxy_admin_name, restricted_container_security};
use crate::validate::ValidatedSpec;

/// Where the init container puts `ballast-drain` in every app pod.
pub const DRAIN_BIN_DIR: &str = "/ballast/bin";
const DRAIN_VOLUME: &str = "ballast-bin";
/// The preStop command's binary.
pub(super) const DRAIN_BINARY: &str = "/ballast/bin/ballast-drain";

/// CPU and memory requests of the drain helper's init container (memory limit alike).
pub const DRAIN_HELPER_REQUESTS: (&str, &str) = ("50m", "64Mi");

/// The drain gate in front of the app's termination: an init container copies the
/// static `ballast-drain` from the ballast image into an emptyDir (so it runs in any
/// image, distroless included), and the serving container's preStop hook runs it. The
/// app gets SIGTERM only once every proxy reports nothing in flight to the pod.
///
/// An init container rather than a native sidecar: the helper must exist only while
/// the hook runs, it needs no lifecycle of its own, and init containers work on every
/// supported Kubernetes version. A user's own preStop runs after the drain: an exec
/// command is chained after `--`, a sleep becomes `--then-sleep`.
pub(super) fn apply_drain_gate(
    v: &ValidatedSpec<'_>,
    ctx: &BuildContext,
    pod: &mut PodSpec,
    serving: usize,
) {
    let proxies = format!(
        "{}.{}.svc:{}",
        proxy_admin_name(v),
        v.namespace,
        v.bs.spec.proxy.admin_port
    );
    pod.volumes.get_or_insert_default().push(Volume {
        name: DRAIN_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("32Mi".to_owned())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    });
    pod.init_containers.get_or_insert_default().push(Container {
        name: "ballast-drain-install".to_owned(),
        image: Some(ctx.proxy_image.clone()),
        command: Some(vec![
            "/usr/local/bin/ballast-drain".to_owned(),
            "install".to_owned(),
            DRAIN_BIN_DIR.to_owned(),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: DRAIN_VOLUME.to_owned(),
            mount_path: DRAIN_BIN_DIR.to_owned(),
            ..VolumeMount::default()
        }]),
        // It copies one file, but asks for Autopilot's smallest container as it is
        // (50m CPU, 52 MiB, 1 to 6.5 GiB per CPU): smaller requests would be raised
        // there, and none at all would be given Autopilot's defaults (0.5 CPU, 2 GiB).
        // An init container's requests only count while no app container runs.
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                (
                    "cpu".to_owned(),
                    Quantity(DRAIN_HELPER_REQUESTS.0.to_owned()),
                ),
                (
                    "memory".to_owned(),
                    Quantity(DRAIN_HELPER_REQUESTS.1.to_owned()),
                ),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity(DRAIN_HELPER_REQUESTS.1.to_owned()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(65532),
            ..restricted_container_security()
        }),
        ..Container::default()
    });
    let Some(container) = pod.containers.get_mut(serving) else {
        return;
    };
    container
        .volume_mounts
        .get_or_insert_default()
        .push(VolumeMount {
            name: DRAIN_VOLUME.to_owned(),
            mount_path: DRAIN_BIN_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    let lifecycle = container.lifecycle.get_or_insert_default();
    let then = match lifecycle.pre_stop.take() {
        Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(user),
            }),
            ..
        }) => AfterDrain::Exec(user),
        Some(LifecycleHandler {
            sleep: Some(SleepAction { seconds }),
            ..
        }) => AfterDrain::Sleep(Duration::from_secs(u64::try_from(seconds).unwrap_or(0))),
        // Other handler kinds are refused by validation.
        _ => AfterDrain::Nothing,
    };
    let drain = DrainSettings {
        proxies,
        timeout: Duration::from_secs(
            u64::try_from(v.bs.spec.rollout.drain_timeout_seconds).unwrap_or(0),
        ),
        then,
    };
    lifecycle.pre_stop = Some(LifecycleHandler {
        exec: Some(ExecAction {
            command: Some(drain.to_command(DRAIN_BINARY)),
        }),
        ..LifecycleHandler::default()
    });
}

/// Ready only once every proxy lists the pod (see `gate`): with maxUnavailable 0 no old
/// pod goes before the proxies can route to its replacement.
pub(super) fn add_routable_gate(pod: &mut PodSpec) {
    let gates = pod.readiness_gates.get_or_insert_default();
    if !gates
        .iter()
        .any(|g| g.condition_type == crate::observe::ROUTABLE_CONDITION)
    {
        gates.push(PodReadinessGate {
            condition_type: crate::observe::ROUTABLE_CONDITION.to_owned(),
        });
    }
}
