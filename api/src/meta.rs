//! How ballast marks the objects it owns and how a user steers a rollout: the labels,
//! the pod condition and the annotations that the operator writes or reads and that
//! the kubectl plugin (`kubectl ballast`) and users read or write. Plain names, no
//! Kubernetes types: one set for every side.

use std::collections::BTreeMap;

/// Labels on the objects the operator owns.
pub mod labels {
    /// The BalancedService an object belongs to (its name).
    pub const SERVICE: &str = "ballast.dev/service";
    /// `app` on app pods and their ReplicaSets, `proxy` on proxy pods.
    pub const ROLE: &str = "ballast.dev/role";
    /// Value of [`ROLE`] on app pods.
    pub const ROLE_APP: &str = "app";
    /// Value of [`ROLE`] on proxy pods.
    pub const ROLE_PROXY: &str = "proxy";
    /// On an adopted Deployment's pods that the backends Service selects (`true`); a
    /// pod taken out of the proxies' rotation ahead of its deletion carries
    /// `retired-<unix second>`.
    pub const BACKEND: &str = "ballast.dev/backend";
    /// The app pod template's revision (a hash of the template).
    pub const REVISION: &str = "ballast.dev/revision";
    /// The Deployment controller's label on each ReplicaSet and pod: the revision of an
    /// adopted Deployment's pods, whose template ballast does not label.
    pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
}

/// The pod condition of the readiness gate: True once every ready proxy lists the pod.
pub const ROUTABLE_CONDITION: &str = "ballast.dev/routable";

/// A request to the operator about the rollout in progress, made by setting an
/// annotation (any value) on the BalancedService; the operator removes it once acted
/// on, and says what it did in an Event and in `status.lastRollout.paused`.
///
/// When several are set at once only the strongest is acted on (abort, then pause,
/// then resume) and all are removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RolloutRequest {
    /// Continue a paused or rolled-back rollout with the spec's template.
    Resume,
    /// Stop the rollout where it is (the app Deployment is applied paused) until
    /// resumed or the spec changes.
    Pause,
    /// Roll back to the previous revision's pod template (pause when there is none)
    /// until resumed or the spec changes.
    Abort,
}

impl RolloutRequest {
    /// Every request, weakest first.
    pub const ALL: [Self; 3] = [Self::Resume, Self::Pause, Self::Abort];

    /// The annotation that makes the request.
    pub const fn annotation(self) -> &'static str {
        match self {
            Self::Resume => "ballast.dev/resume",
            Self::Pause => "ballast.dev/pause",
            Self::Abort => "ballast.dev/abort",
        }
    }

    /// The requests `annotations` make, weakest first.
    pub fn requested(annotations: &BTreeMap<String, String>) -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|r| annotations.contains_key(r.annotation()))
            .collect()
    }

    /// The request acted on when `annotations` make several: the strongest.
    pub fn strongest(annotations: &BTreeMap<String, String>) -> Option<Self> {
        Self::requested(annotations).into_iter().max()
    }
}

/// The pod-template annotation whose change starts a new rollout of the same template,
/// as `kubectl rollout restart` sets it.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strongest_request_wins() {
        let annotations = |keys: &[&str]| -> BTreeMap<String, String> {
            keys.iter()
                .map(|k| ((*k).to_owned(), String::new()))
                .collect()
        };
        assert_eq!(RolloutRequest::strongest(&annotations(&[])), None);
        assert_eq!(
            RolloutRequest::strongest(&annotations(&["ballast.dev/resume", "other"])),
            Some(RolloutRequest::Resume)
        );
        assert_eq!(
            RolloutRequest::strongest(&annotations(&["ballast.dev/resume", "ballast.dev/pause"])),
            Some(RolloutRequest::Pause)
        );
        let all = annotations(&[
            "ballast.dev/abort",
            "ballast.dev/pause",
            "ballast.dev/resume",
        ]);
        assert_eq!(RolloutRequest::strongest(&all), Some(RolloutRequest::Abort));
        assert_eq!(RolloutRequest::requested(&all), RolloutRequest::ALL);
    }
}
