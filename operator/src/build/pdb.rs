//! Disruption budgets of the app pods and the proxy pods.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{meta, proxy_name, selector_labels};
use crate::validate::ValidatedSpec;

fn pdb(
    v: &ValidatedSpec<'_>,
    object_name: String,
    role: &str,
    min: Option<IntOrString>,
    max: Option<IntOrString>,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(v, object_name),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(v.bs, role)),
                ..LabelSelector::default()
            }),
            min_available: min,
            max_unavailable: max,
            // A crash-looping pod must not block node drains.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
        }),
        ..PodDisruptionBudget::default()
    }
}

/// `spec.disruption`, one pod at a time when it sets nothing.
pub(super) fn app_pdb(v: &ValidatedSpec<'_>) -> PodDisruptionBudget {
    let d = &v.bs.spec.disruption;
    let (min, max) = match (&d.min_available, &d.max_unavailable) {
        (None, None) => (None, Some(IntOrString::Int(1))),
        (min, max) => (min.clone(), max.clone()),
    };
    pdb(v, v.name.to_owned(), "app", min, max)
}

/// One proxy at a time.
pub(super) fn proxy_pdb(v: &ValidatedSpec<'_>) -> PodDisruptionBudget {
    pdb(v, proxy_name(v), "proxy", None, Some(IntOrString::Int(1)))
}
