//! The Services: the front Service clients use, the headless backends Service the
//! proxies discover pods through, and the admin Service the drain helper resolves.

use ballast_api::spec::AppProtocol;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BACKEND_LABEL, BACKEND_SERVING, backends_name, meta, proxy_admin_name, selector_labels,
};
use crate::validate::ValidatedSpec;
use k8s_openapi::api::apps::v1::Deployment;
use std::collections::BTreeMap;

fn app_protocol(protocol: AppProtocol) -> &'static str {
    match protocol {
        AppProtocol::Http => "http",
        AppProtocol::H2c => "kubernetes.io/h2c",
        AppProtocol::Grpc => "grpc",
    }
}

/// Headless Service over the app pods: Kubernetes keeps its EndpointSlices, whose
/// named ports the proxies' listeners pick.
pub(super) fn backends_service(v: &ValidatedSpec<'_>) -> Service {
    let ports = v
        .ports
        .iter()
        .map(|served| ServicePort {
            name: Some(served.port.name.clone()),
            port: served.port.port,
            target_port: Some(served.target_port.clone()),
            app_protocol: Some(app_protocol(served.port.app_protocol).to_owned()),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        })
        .collect();
    Service {
        metadata: meta(v, backends_name(v)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(backends_selector(v)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The app pods the proxies balance over. An adopted Deployment's pods are selected by
/// its own selector plus [`BACKEND_LABEL`]: its pods that predate the adoption get the
/// label from the operator, and taking it away is how the operator retires a pod that
/// has no drain gate (see `adopt`).
pub fn backends_selector(v: &ValidatedSpec<'_>) -> BTreeMap<String, String> {
    match v.adopted {
        None => selector_labels(v.bs, "app"),
        Some(deployment) => {
            let mut selector = deployment_match_labels(deployment);
            selector.insert(BACKEND_LABEL.to_owned(), BACKEND_SERVING.to_owned());
            selector
        }
    }
}

/// The `matchLabels` of a Deployment's selector (validation refuses a selector with
/// expressions, which no Service can express).
pub fn deployment_match_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
}

/// Headless Service over every proxy replica, ready or not.
pub(super) fn proxy_admin_service(v: &ValidatedSpec<'_>) -> Service {
    Service {
        metadata: meta(v, proxy_admin_name(v)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Not-ready proxies still hold connections to draining pods: the drain
            // helper must see them too.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(v.bs, "proxy")),
            ports: Some(vec![ServicePort {
                name: Some("admin".to_owned()),
                port: v.bs.spec.proxy.admin_port,
                target_port: Some(IntOrString::String("admin".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// What clients use: selects the proxies, each port to its listener's container port,
/// by number: proxy pods of an older operator named their one client port `proxy`, and a
/// target by the new name would leave the front Service without endpoints until the
/// first new proxy is ready, while one by number reaches old and new pods alike (the
/// first listener has always been 8080).
pub(super) fn front_service(v: &ValidatedSpec<'_>) -> Service {
    let ports = v
        .ports
        .iter()
        .map(|served| ServicePort {
            name: Some(served.port.name.clone()),
            port: served.port.port,
            target_port: Some(IntOrString::Int(i32::from(served.proxy_port))),
            app_protocol: Some(app_protocol(served.port.app_protocol).to_owned()),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        })
        .collect();
    let service = &v.bs.spec.service;
    let mut metadata = meta(v, v.front_name.to_owned());
    let annotations = super::gke::front_annotations(v);
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(format!("{:?}", service.type_)),
            traffic_distribution: service.traffic_distribution.map(|t| t.as_str().to_owned()),
            selector: Some(selector_labels(v.bs, "proxy")),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
