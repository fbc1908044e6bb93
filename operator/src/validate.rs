//! What the CRD's schema and CEL rules cannot check, checked before anything is applied.
//! An invalid spec changes nothing already running: the reconcile stops here and the
//! message goes to status (`Degraded=True, reason=InvalidSpec`) and an Event.

use ballast_api::BalancedService;
use ballast_api::spec::{AffinityType, AppProtocol, BalancedPort, MAX_PORTS};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::fmt;

/// Limits the operator enforces beyond the schema.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest `spec.replicas` accepted.
    pub max_replicas: i32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_replicas: 1000 }
    }
}

/// Port the proxy container listens on for clients of the first spec port; the next
/// ports get the numbers after it, in spec order (the front Service targets them by
/// name).
pub const PROXY_PORT: u16 = 8080;

/// Longest BalancedService name: `<name>-proxy-admin` must be a valid Service name
/// (a DNS label, at most 63 characters).
pub const MAX_NAME_LEN: usize = 63 - "-proxy-admin".len();

/// One spec port as the proxy serves it, resolved once.
#[derive(Clone, Debug)]
pub struct ServedPort<'a> {
    /// The spec's entry.
    pub port: &'a BalancedPort,
    /// Where the backends Service sends traffic: `targetPort`, else the port's number.
    pub target_port: IntOrString,
    /// The proxy container port of its listener, named after the port.
    pub proxy_port: u16,
}

/// A BalancedService that passed [`validate`]: the builders' only input. What
/// validation established is resolved here once (the proxied ports, where the
/// generated probes go), so no builder indexes a list or falls back on a default it
/// hopes is never used.
#[derive(Clone, Debug)]
pub struct ValidatedSpec<'a> {
    /// The checked object.
    pub bs: &'a BalancedService,
    /// Its name, a DNS label short enough for every derived Service name.
    pub name: &'a str,
    /// Its namespace; `default` when the object names none (a file given to `render`).
    pub namespace: &'a str,
    /// The pod template the app Deployment runs: `spec.template`, or the adopted
    /// Deployment's own.
    pub template: &'a PodTemplateSpec,
    /// The Deployment `spec.workloadRef` names, as read from the API server: ballast
    /// then applies only its own fields to it.
    pub adopted: Option<&'a Deployment>,
    /// Name of the front Service (`spec.service.name`, else the BalancedService's).
    pub front_name: &'a str,
    /// Every port, in spec order: one proxy listener and one port of each Service each.
    pub ports: Vec<ServedPort<'a>>,
    /// The first port's target: the container that declares it gets the generated
    /// probes and the drain gate.
    pub serving_port: IntOrString,
    /// The protocol generated probes speak: the first port's.
    pub probe_protocol: AppProtocol,
    /// Where generated probes go: `spec.probes.port`, else the first port's target.
    pub probe_port: IntOrString,
    /// `probe_port` as a container port number (a gRPC probe takes no name).
    pub probe_port_number: i32,
    /// The proxies' admin port.
    pub admin_port: u16,
    /// The affinity key the proxy reads (`header:<name>`, `cookie:<name>`,
    /// `client-ip`), when `spec.balancing.affinity` is set.
    pub affinity_key: Option<String>,
}

/// One problem, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.probes.port`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem of an invalid spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<FieldError>);

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("; "))
    }
}

/// Checks a BalancedService; `Ok` carries what the builders need. `adopted` is the
/// Deployment `spec.workloadRef` names (read by the caller); its pod template is checked
/// as `spec.template` would be, except for what its owner may write (images, labels).
///
/// # Errors
/// Every problem found.
pub fn validate<'a>(
    bs: &'a BalancedService,
    adopted: Option<&'a Deployment>,
    limits: &Limits,
) -> Result<ValidatedSpec<'a>, InvalidSpec> {
    let mut errors = Vec::new();
    let mut fail = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            message,
        })
    };
    let spec = &bs.spec;
    let name = bs.metadata.name.as_deref().unwrap_or_default();

    if name.len() > MAX_NAME_LEN {
        fail(
            "metadata.name",
            format!(
                "at most {MAX_NAME_LEN} characters, so that `<name>-proxy-admin` is a valid Service name"
            ),
        );
    }
    if !is_dns_label(name) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        // The API server accepts any DNS subdomain as a BalancedService name, but the name
        // becomes Service names (`<name>`, `<name>-backends`, `<name>-proxy-admin`),
        // which must be DNS-1035 labels.
        fail(
            "metadata.name",
            format!(
                "{name:?} cannot name a Service: use lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (no '.')"
            ),
        );
    }
    if spec.replicas > limits.max_replicas {
        fail(
            "spec.replicas",
            format!(
                "{} is above this operator's limit of {}",
                spec.replicas, limits.max_replicas
            ),
        );
    }
    if spec.ports.is_empty() {
        fail("spec.ports", "list the port the app serves".to_owned());
    }
    if spec.ports.len() > MAX_PORTS {
        fail(
            "spec.ports",
            format!(
                "{} ports given; a BalancedService proxies at most {MAX_PORTS}: give further ports their own BalancedService",
                spec.ports.len()
            ),
        );
    }
    for (i, port) in spec.ports.iter().enumerate() {
        // The proxy container names its listener's port after it.
        if !is_container_port_name(&port.name) || port.name == "admin" {
            fail(
                &format!("spec.ports[{i}].name"),
                format!(
                    "{:?} cannot name the proxy's container port: at most 15 lowercase letters, digits and single '-', with a letter, and not \"admin\"",
                    port.name
                ),
            );
        }
    }

    let adopted = adopted.filter(|_| spec.workload_ref.is_some());
    let template = match (&spec.template, &spec.workload_ref, adopted) {
        (Some(template), None, _) => Some(template),
        (None, Some(_), Some(deployment)) => deployment.spec.as_ref().map(|s| &s.template),
        (None, Some(reference), None) => {
            fail(
                "spec.workloadRef",
                format!("Deployment {:?} was not given", reference.name),
            );
            None
        }
        _ => {
            // The CRD's CEL rule refuses this; `render` reads files the API server
            // never saw.
            fail(
                "spec",
                "set exactly one of template and workloadRef".to_owned(),
            );
            None
        }
    };
    // Where the problems of the template are: the field the user wrote.
    let at = if adopted.is_some() {
        "Deployment.spec.template"
    } else {
        "spec.template"
    };
    if adopted.is_some() && spec.rollout.pause_when.rollback {
        fail(
            "spec.rollout.pauseWhen.rollback",
            "rollback needs spec.template: with workloadRef the Deployment's image and env are its owner's, so ballast pauses a bad rollout and its owner rolls back".to_owned(),
        );
    }
    if let Some(deployment) = adopted {
        let selector = deployment.spec.as_ref().map(|s| &s.selector);
        if selector.is_some_and(|s| s.match_expressions.as_ref().is_some_and(|e| !e.is_empty()))
            || selector
                .and_then(|s| s.match_labels.as_ref())
                .is_none_or(|l| l.is_empty())
        {
            fail(
                "spec.workloadRef",
                "the Deployment's selector must be matchLabels only: the proxies find its pods through a Service, and a Service cannot select by expressions".to_owned(),
            );
        }
    }
    let front_name = spec.service.name.as_deref().unwrap_or(name);
    if !is_dns_label(front_name) {
        fail(
            "spec.service.name",
            format!("{front_name:?} cannot name a Service (a DNS label)"),
        );
    }
    for derived in [
        format!("{name}-backends"),
        format!("{name}-proxy-admin"),
        format!("{name}-proxy"),
    ] {
        if front_name == derived {
            fail(
                "spec.service.name",
                format!(
                    "{front_name:?} is the name of a Service or Deployment ballast creates; choose another"
                ),
            );
        }
    }
    let lb = spec.proxy.load_balancer.as_ref();
    for annotation in [
        crate::build::NEG_ANNOTATION,
        crate::build::BACKEND_CONFIG_ANNOTATION,
    ] {
        if !spec.service.annotations.contains_key(annotation) {
            continue;
        }
        let why = match lb.map(|lb| lb.type_) {
            Some(ballast_api::spec::LoadBalancerType::Ingress) => {
                "ballast sets it from spec.proxy.loadBalancer; remove it from spec.service.annotations"
            }
            _ => {
                "a Google load balancer sending to the proxies needs spec.proxy.loadBalancer, so that a stopping proxy outlasts the load balancer's draining (else every proxy rollout is 502s); set that instead of the annotation"
            }
        };
        fail(
            &format!("spec.service.annotations[{annotation}]"),
            why.to_owned(),
        );
    }
    if let Some(lb) = lb
        && lb.health_check.timeout_seconds > lb.health_check.check_interval_seconds
    {
        // The CRD's CEL rule refuses this; `render` reads files the API server never saw.
        fail(
            "spec.proxy.loadBalancer.healthCheck.timeoutSeconds",
            "cannot exceed checkIntervalSeconds (Google Cloud refuses such a health check)"
                .to_owned(),
        );
    }
    let containers = template
        .and_then(|t| t.spec.as_ref())
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    if containers.is_empty() && template.is_some() {
        fail(
            &format!("{at}.spec.containers"),
            "at least one container is required".to_owned(),
        );
    }
    let declared: Vec<(&str, i32)> = containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.as_deref()?, p.container_port)))
        .collect();
    let port_names: Vec<&str> = declared.iter().map(|(name, _)| *name).collect();
    for (i, port) in spec.ports.iter().enumerate() {
        if let Some(IntOrString::String(target)) = &port.target_port
            && !port_names.contains(&target.as_str())
        {
            fail(
                &format!("spec.ports[{i}].targetPort"),
                format!("no container declares a port named {target:?} (declared: {port_names:?})"),
            );
        }
    }
    if let Some(IntOrString::String(probe)) = &spec.probes.port
        && !port_names.contains(&probe.as_str())
    {
        fail(
            "spec.probes.port",
            format!("no container declares a port named {probe:?} (declared: {port_names:?})"),
        );
    }

    for (field, value) in [
        ("spec.rollout.maxSurge", Some(&spec.rollout.max_surge)),
        (
            "spec.rollout.maxUnavailable",
            Some(&spec.rollout.max_unavailable),
        ),
        (
            "spec.disruption.minAvailable",
            spec.disruption.min_available.as_ref(),
        ),
        (
            "spec.disruption.maxUnavailable",
            spec.disruption.max_unavailable.as_ref(),
        ),
    ] {
        if let Some(IntOrString::String(text)) = value
            && !is_percent(text)
        {
            fail(
                field,
                format!("{text:?} is neither a number nor a percentage such as \"25%\""),
            );
        }
    }

    let affinity_key = match &spec.balancing.affinity {
        None => None,
        Some(affinity) => match (affinity.type_, &affinity.header) {
            (AffinityType::Header, Some(header)) => Some(format!("header:{header}")),
            (AffinityType::Header, None) => {
                // The CRD's CEL rule refuses this; `render` reads files the API server
                // never saw.
                fail(
                    "spec.balancing.affinity.header",
                    "type Header needs header".to_owned(),
                );
                None
            }
            (AffinityType::Cookie, _) => Some(format!("cookie:{}", affinity.cookie.name)),
            (AffinityType::ClientIp, _) => Some("client-ip".to_owned()),
        },
    };

    let admin_port = u16::try_from(spec.proxy.admin_port)
        .ok()
        .filter(|&p| p != 0);
    if admin_port.is_none() {
        fail(
            "spec.proxy.adminPort",
            format!("{} is not a port (1-65535)", spec.proxy.admin_port),
        );
    }
    let proxy_ports = proxy_ports(spec.ports.len());
    if let Some(admin) = admin_port
        && proxy_ports.contains(&admin)
    {
        fail(
            "spec.proxy.adminPort",
            format!(
                "{admin} is one of the proxy's client ports ({}-{}, one per spec port); choose another",
                proxy_ports.start,
                proxy_ports.end.saturating_sub(1)
            ),
        );
    }
    for (i, container) in containers.iter().enumerate() {
        let pre_stop = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref());
        if pre_stop.is_some_and(|h| h.exec.is_none() && h.sleep.is_none()) {
            fail(
                &format!("{at}.spec.containers[{i}].lifecycle.preStop"),
                "only exec and sleep preStop hooks can run after the drain; turn this one into an exec command".to_owned(),
            );
        }
    }
    for (i, container) in containers.iter().enumerate() {
        if !is_dns_label(&container.name) {
            fail(
                &format!("{at}.spec.containers[{i}].name"),
                format!(
                    "{:?} is not a valid container name (a DNS label)",
                    container.name
                ),
            );
        }
        if adopted.is_none()
            && container
                .image
                .as_deref()
                .is_none_or(|image| image.trim().is_empty())
        {
            fail(
                &format!("spec.template.spec.containers[{i}].image"),
                "an image is required".to_owned(),
            );
        }
    }
    // An adopted Deployment's template carries ballast's labels once applied.
    let labels = template
        .filter(|_| adopted.is_none())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.as_ref());
    for (key, value) in labels.into_iter().flatten() {
        if key.starts_with("ballast.dev/") {
            fail(
                "spec.template.metadata.labels",
                format!("{key:?} is reserved for the operator"),
            );
        } else if !is_label_key(key) {
            fail(
                "spec.template.metadata.labels",
                format!(
                    "{key:?} is not a valid label key (an optional DNS prefix and '/', then at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric)"
                ),
            );
        } else if !is_label_value(value) {
            fail(
                "spec.template.metadata.labels",
                format!(
                    "the value {value:?} of {key:?} is not a valid label value (at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric)"
                ),
            );
        }
    }
    // A named port resolves to the first container port declaring it; an undeclared
    // name has failed above.
    let number = |port: &IntOrString| match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => declared
            .iter()
            .find(|(declared, _)| declared == name)
            .map(|(_, number)| *number),
    };
    match (spec.ports.first(), admin_port, template) {
        (Some(first), Some(admin_port), Some(template)) if errors.is_empty() => {
            let target = |port: &BalancedPort| {
                port.target_port
                    .clone()
                    .unwrap_or(IntOrString::Int(port.port))
            };
            let serving_port = target(first);
            let probe_port = spec.probes.port.clone().unwrap_or(serving_port.clone());
            let probe_port_number = number(&probe_port).ok_or_else(|| {
                InvalidSpec(vec![FieldError {
                    field: "spec.probes.port".to_owned(),
                    message: format!("no container declares the port {probe_port:?}"),
                }])
            })?;
            Ok(ValidatedSpec {
                bs,
                name,
                namespace: bs.metadata.namespace.as_deref().unwrap_or("default"),
                template,
                adopted,
                front_name,
                ports: spec
                    .ports
                    .iter()
                    .zip(proxy_ports)
                    .map(|(port, proxy_port)| ServedPort {
                        port,
                        target_port: target(port),
                        proxy_port,
                    })
                    .collect(),
                serving_port,
                probe_protocol: first.app_protocol,
                probe_port,
                probe_port_number,
                admin_port,
                affinity_key,
            })
        }
        _ => Err(InvalidSpec(errors)),
    }
}

/// The proxy container's client ports for `count` spec ports: [`PROXY_PORT`] and the
/// numbers after it.
pub fn proxy_ports(count: usize) -> std::ops::Range<u16> {
    let count = u16::try_from(count.min(MAX_PORTS)).unwrap_or(0);
    PROXY_PORT..PROXY_PORT + count
}

/// A container port name (IANA_SVC_NAME): at most 15 of `[a-z0-9-]`, at least one
/// letter, alphanumeric at both ends, no `--`.
fn is_container_port_name(text: &str) -> bool {
    text.len() <= 15
        && is_dns_label(text)
        && !text.contains("--")
        && text.bytes().any(|b| b.is_ascii_lowercase())
}

/// An RFC 1123 label: at most 63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// A label value: empty, or at most 63 of `[A-Za-z0-9-_.]`, alphanumeric at both ends.
fn is_label_value(text: &str) -> bool {
    text.is_empty() || is_qualified_name_part(text)
}

fn is_qualified_name_part(text: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && text.starts_with(alnum)
        && text.ends_with(alnum)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain of at most 253 characters.
fn is_label_key(text: &str) -> bool {
    match text.split_once('/') {
        None => is_qualified_name_part(text),
        Some((prefix, name)) => {
            prefix.len() <= 253
                && prefix.split('.').all(is_dns_label)
                && is_qualified_name_part(name)
        }
    }
}

fn is_percent(text: &str) -> bool {
    text.strip_suffix('%')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests;
