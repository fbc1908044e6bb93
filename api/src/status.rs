//! `BalancedService` status: what the operator observed, written only by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a `BalancedService`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BalancedServiceStatus {
    /// The `metadata.generation` this status describes. Older than the generation means
    /// the operator has not yet acted on the latest spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Available`, `Progressing` and `Degraded`, in the standard Kubernetes shape.
    /// `lastTransitionTime` changes only when a condition's status does.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,

    /// One word summarising the conditions: `Available`, `Progressing`, `Degraded`,
    /// `Paused` or `Pending`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,

    /// App pods, any revision (the scale subresource's status replicas).
    pub replicas: i32,
    /// App pods that pass readiness.
    pub ready_replicas: i32,
    /// App pods running the newest revision.
    pub updated_replicas: i32,
    /// App pods ready for at least `minReadySeconds`.
    pub available_replicas: i32,
    /// `available/desired`, for the READY column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Label selector of the app pods, in string form (used by `kubectl scale` and HPAs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Revision (pod-template hash) most pods run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// Revision being rolled out; equals `currentRevision` once the rollout completes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,

    /// Pods being drained right now, with what the proxies still report in flight.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub draining: Vec<DrainingPod>,

    /// The most recent rollout, finished or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rollout: Option<RolloutSummary>,

    /// How evenly requests spread over the app pods recently.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<BalanceSummary>,

    /// Readiness of the proxy pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyStatus>,
}

/// A pod being drained.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainingPod {
    /// Pod name.
    pub pod: String,
    /// When the first proxy marked it draining.
    pub since: Time,
    /// Requests still in flight to it, summed over all proxies.
    pub in_flight: i64,
    /// Connections still open to it, summed over all proxies.
    pub connections: i64,
}

/// What happened during a rollout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSummary {
    /// Revision rolled out.
    pub revision: String,
    /// Revision the pods ran before (the one a rollback restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    /// When the rollout started.
    pub started_at: Time,
    /// When it completed; unset while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Seconds from start to completion; 0 while it runs (written once, when it ends).
    pub duration_seconds: i64,
    /// Old pods drained before termination.
    pub pods_drained: i32,
    /// Longest single drain, in milliseconds.
    pub longest_drain_millis: i64,
    /// Drains that hit `drainTimeoutSeconds` with requests or connections still open.
    pub forced_terminations: i32,
    /// Requests the proxies sent during the rollout.
    #[serde(default)]
    pub requests: RevisionCounts,
    /// Failed requests (5xx or connection failure) the proxies saw during the rollout.
    pub failed_requests: RevisionCounts,
    /// Set when ballast paused (or rolled back) this rollout because it went badly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<RolloutPause>,
}

/// Why and when a rollout was paused.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPause {
    /// When it was paused.
    pub at: Time,
    /// The threshold that was crossed, with the numbers.
    pub reason: String,
    /// `metadata.generation` when it was paused: any later spec change resumes.
    pub generation: i64,
    /// True once resumed (spec change or the `ballast.dev/resume` annotation). A resumed
    /// rollout is not paused again.
    #[serde(default)]
    pub resumed: bool,
    /// True when the previous pod template was restored instead of pausing.
    #[serde(default)]
    pub rolled_back: bool,
}

/// Request counts split by the revision of the pod that served them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RevisionCounts {
    /// On pods of the previous revision.
    pub old_revision: i64,
    /// On pods of the revision being rolled out.
    pub new_revision: i64,
}

/// Spread of requests over app pods in a recent window.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BalanceSummary {
    /// Busiest pod's request rate over the mean rate, two decimals ("1.00" is perfect).
    pub max_over_mean: String,
    /// Length of the window in seconds.
    pub window_seconds: i32,
    /// Pods that served requests in the window.
    pub pods: i32,
}

/// Readiness of the proxy pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyStatus {
    /// Proxy pods desired.
    pub replicas: i32,
    /// Proxy pods ready to take traffic.
    pub ready_replicas: i32,
}
