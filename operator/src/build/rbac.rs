//! The proxies' identity and their read-only access to EndpointSlices.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::{meta, proxy_name};
use crate::validate::ValidatedSpec;

/// The proxies' identity.
pub(super) fn proxy_service_account(v: &ValidatedSpec<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(v, proxy_name(v)),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

/// Read-only EndpointSlices in the namespace.
pub(super) fn proxy_role(v: &ValidatedSpec<'_>) -> Role {
    Role {
        metadata: meta(v, proxy_name(v)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_owned()]),
            resources: Some(vec!["endpointslices".to_owned()]),
            verbs: ["get", "list", "watch"].map(str::to_owned).to_vec(),
            ..PolicyRule::default()
        }]),
    }
}

/// Grants the role to the service account.
pub(super) fn proxy_role_binding(v: &ValidatedSpec<'_>) -> RoleBinding {
    RoleBinding {
        metadata: meta(v, proxy_name(v)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: proxy_name(v),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: proxy_name(v),
            namespace: v.bs.metadata.namespace.clone(),
            ..Subject::default()
        }]),
    }
}
