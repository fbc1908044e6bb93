//! The Services: the front Service clients use, the headless backends Service the
//! proxies discover pods through, and the admin Service the drain helper resolves.

use ballast_api::spec::AppProtocol;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{backends_name, meta, proxy_admin_name, selector_labels};
use crate::validate::ValidatedSpec;

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
            selector: Some(selector_labels(v.bs, "app")),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
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

/// What clients use: selects the proxies, each port to its listener's container port.
pub(super) fn front_service(v: &ValidatedSpec<'_>) -> Service {
    let ports = v
        .ports
        .iter()
        .map(|served| ServicePort {
            name: Some(served.port.name.clone()),
            port: served.port.port,
            target_port: Some(IntOrString::String(served.port.name.clone())),
            app_protocol: Some(app_protocol(served.port.app_protocol).to_owned()),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        })
        .collect();
    let service = &v.bs.spec.proxy.service;
    let mut metadata = meta(v, v.name.to_owned());
    if !service.annotations.is_empty() {
        metadata.annotations = Some(service.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(format!("{:?}", service.type_)),
            selector: Some(selector_labels(v.bs, "proxy")),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
