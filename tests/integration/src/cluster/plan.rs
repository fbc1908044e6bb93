//! What the stand-in reads from a Deployment: the pod it must act out and the rolling
//! update it must follow. Pure: a `Deployment` in, plain numbers and strings out.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVarSource, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::hash::{Hash, Hasher};
use std::time::Duration;

/// How a Deployment rolls: its replicas and `strategy.rollingUpdate`, resolved to pod
/// counts the way the Deployment controller resolves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutPlan {
    /// Desired pods.
    pub replicas: u32,
    /// Pods above `replicas` allowed during a rollout (percentages round up).
    pub max_surge: u32,
    /// Pods below `replicas` allowed during a rollout (percentages round down; never
    /// zero together with `max_surge`).
    pub max_unavailable: u32,
    /// A ready pod counts as available after this long.
    pub min_ready: Duration,
}

/// One probe of the serving container, as kubelet runs it (HTTP GET only: the stand-in
/// acts out HTTP apps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePlan {
    /// Request path.
    pub path: String,
    /// Container port.
    pub port: u16,
    /// Wait before the first probe.
    pub initial_delay: Duration,
    /// Time between probes.
    pub period: Duration,
    /// Limit of one probe.
    pub timeout: Duration,
    /// Consecutive successes that make it pass.
    pub success_threshold: u32,
    /// Consecutive failures that make it fail.
    pub failure_threshold: u32,
}

/// The container's preStop hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreStop {
    /// No hook: SIGTERM at once.
    None,
    /// Run this command (argv) in the pod.
    Exec(Vec<String>),
    /// Sleep, then SIGTERM.
    Sleep(Duration),
}

/// A value of an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    /// A literal.
    Literal(String),
    /// `fieldRef` (downward API), by field path.
    Field(String),
}

/// The pod a Deployment creates, reduced to what the stand-in acts out: its serving
/// (first) container, probes, readiness gates, preStop hook and grace period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    /// Hash of the pod template, like `pod-template-hash`: pods of one template share it.
    pub revision: String,
    /// Container image; the stand-in maps it to a local program.
    pub image: String,
    /// `command` (replaces the image's entrypoint when set).
    pub command: Vec<String>,
    /// `args`.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, EnvValue)>,
    /// First declared container port.
    pub port: u16,
    /// Readiness probe.
    pub readiness: Option<ProbePlan>,
    /// Startup probe (readiness probing starts once it passed).
    pub startup: Option<ProbePlan>,
    /// Pod conditions that must be True too before the pod is Ready.
    pub readiness_gates: Vec<String>,
    /// The serving container's preStop hook.
    pub pre_stop: PreStop,
    /// `terminationGracePeriodSeconds`: preStop plus SIGTERM get this long, then SIGKILL.
    pub grace: Duration,
}

/// A Deployment as the stand-in acts it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentPlan {
    /// Deployment name (pods are named after it).
    pub name: String,
    /// The pods.
    pub pod: PodPlan,
    /// The rolling update.
    pub rollout: RolloutPlan,
}

impl DeploymentPlan {
    /// Reads `deployment`.
    ///
    /// # Errors
    /// What the stand-in cannot act out: no container, no container port, a non-HTTP
    /// probe, a preStop kind other than exec or sleep, a strategy other than
    /// RollingUpdate.
    pub fn from_deployment(deployment: &Deployment) -> Result<Self, String> {
        let name = deployment
            .metadata
            .name
            .clone()
            .ok_or("the Deployment has no name")?;
        let spec = deployment
            .spec
            .as_ref()
            .ok_or("the Deployment has no spec")?;
        let pod_spec = spec
            .template
            .spec
            .as_ref()
            .ok_or("the pod template has no spec")?;
        let container = pod_spec
            .containers
            .first()
            .ok_or("the pod template has no container")?;
        let port = container
            .ports
            .iter()
            .flatten()
            .next()
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or("the serving container declares no port")?;
        let probe = |p: &Option<Probe>| p.as_ref().map(|p| probe_plan(p, container)).transpose();
        let replicas = u32::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
        let strategy = spec.strategy.as_ref();
        if strategy
            .and_then(|s| s.type_.as_deref())
            .is_some_and(|t| t != "RollingUpdate")
        {
            return Err("only the RollingUpdate strategy is acted out".to_owned());
        }
        let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
        let quarter = IntOrString::String("25%".to_owned());
        let max_surge = scaled(
            rolling
                .and_then(|r| r.max_surge.as_ref())
                .unwrap_or(&quarter),
            replicas,
            true,
        )?;
        let mut max_unavailable = scaled(
            rolling
                .and_then(|r| r.max_unavailable.as_ref())
                .unwrap_or(&quarter),
            replicas,
            false,
        )?;
        // As the Deployment controller does: both zero would never make progress.
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        let template_json = serde_json::to_string(&spec.template).map_err(|e| e.to_string())?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        template_json.hash(&mut hasher);
        Ok(Self {
            name,
            pod: PodPlan {
                revision: format!("{:05x}", hasher.finish() & 0xf_ffff),
                image: container.image.clone().unwrap_or_default(),
                command: container.command.clone().unwrap_or_default(),
                args: container.args.clone().unwrap_or_default(),
                env: container
                    .env
                    .iter()
                    .flatten()
                    .filter_map(|e| {
                        let value = match (&e.value, &e.value_from) {
                            (Some(v), _) => EnvValue::Literal(v.clone()),
                            (
                                None,
                                Some(EnvVarSource {
                                    field_ref: Some(f), ..
                                }),
                            ) => EnvValue::Field(f.field_path.clone()),
                            _ => return None,
                        };
                        Some((e.name.clone(), value))
                    })
                    .collect(),
                port,
                readiness: probe(&container.readiness_probe)?,
                startup: probe(&container.startup_probe)?,
                readiness_gates: pod_spec
                    .readiness_gates
                    .iter()
                    .flatten()
                    .map(|g| g.condition_type.clone())
                    .collect(),
                pre_stop: pre_stop(
                    container
                        .lifecycle
                        .as_ref()
                        .and_then(|l| l.pre_stop.as_ref()),
                )?,
                grace: Duration::from_secs(
                    u64::try_from(pod_spec.termination_grace_period_seconds.unwrap_or(30))
                        .unwrap_or(30),
                ),
            },
            rollout: RolloutPlan {
                replicas,
                max_surge,
                max_unavailable,
                min_ready: Duration::from_secs(
                    u64::try_from(spec.min_ready_seconds.unwrap_or(0)).unwrap_or(0),
                ),
            },
        })
    }
}

/// An int-or-string of a rolling update resolved against `replicas`.
fn scaled(value: &IntOrString, replicas: u32, round_up: bool) -> Result<u32, String> {
    match value {
        IntOrString::Int(n) => u32::try_from(*n).map_err(|_| format!("negative count {n}")),
        IntOrString::String(s) => {
            let percent: u32 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("{s:?} is not a percentage"))?;
            let scaled = replicas * percent;
            Ok(if round_up {
                scaled.div_ceil(100)
            } else {
                scaled / 100
            })
        }
    }
}

fn seconds(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn probe_plan(probe: &Probe, container: &Container) -> Result<ProbePlan, String> {
    let get = probe
        .http_get
        .as_ref()
        .ok_or("only HTTP GET probes are acted out")?;
    let port = match &get.port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
    .ok_or_else(|| format!("probe port {:?} is not a container port", get.port))?;
    let threshold = |v: Option<i32>, default: u32| {
        v.and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(default)
    };
    Ok(ProbePlan {
        path: get.path.clone().unwrap_or_else(|| "/".to_owned()),
        port,
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10),
        timeout: seconds(probe.timeout_seconds, 1),
        success_threshold: threshold(probe.success_threshold, 1),
        failure_threshold: threshold(probe.failure_threshold, 3),
    })
}

fn pre_stop(hook: Option<&LifecycleHandler>) -> Result<PreStop, String> {
    let Some(hook) = hook else {
        return Ok(PreStop::None);
    };
    if let Some(command) = hook.exec.as_ref().and_then(|e| e.command.clone()) {
        return Ok(PreStop::Exec(command));
    }
    if let Some(sleep) = &hook.sleep {
        return Ok(PreStop::Sleep(Duration::from_secs(
            u64::try_from(sleep.seconds).unwrap_or(0),
        )));
    }
    Err("only exec and sleep preStop hooks are acted out".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_resolve_like_the_deployment_controller() {
        let pct = |s: &str| IntOrString::String(s.to_owned());
        assert_eq!(scaled(&pct("25%"), 8, true), Ok(2));
        assert_eq!(scaled(&pct("25%"), 7, true), Ok(2));
        assert_eq!(scaled(&pct("25%"), 7, false), Ok(1));
        assert_eq!(scaled(&IntOrString::Int(3), 8, false), Ok(3));
        assert!(scaled(&pct("x"), 8, false).is_err());
    }
}
