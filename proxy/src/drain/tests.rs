use super::resolve::is_name_not_found;
use super::{ReplicaState, ResolveError, cluster_domain, qualify, resolve};
use bytes::Bytes;
use http::StatusCode;
use std::io;

#[tokio::test]
async fn resolves_a_comma_separated_list_to_the_union() {
    let got = resolve("127.0.0.3:9901, 127.0.0.2:9901,127.0.0.3:9901")
        .await
        .unwrap();
    let want: Vec<std::net::SocketAddr> = vec![
        "127.0.0.2:9901".parse().unwrap(),
        "127.0.0.3:9901".parse().unwrap(),
    ];
    assert_eq!(got, want);
    // A configuration mistake is never "no proxies": the pod waits, as before.
    for wrong in [" , ", "127.0.0.2"] {
        assert!(
            matches!(resolve(wrong).await, Err(ResolveError::Lookup { .. })),
            "{wrong}"
        );
    }
}

#[test]
fn only_no_such_name_and_no_address_mean_no_proxies() {
    // What std makes of getaddrinfo's codes: "failed to lookup address information: "
    // and gai_strerror's text (glibc, then musl).
    let said = |text: &str| {
        is_name_not_found(&io::Error::other(format!(
            "failed to lookup address information: {text}"
        )))
    };
    for absent in [
        "Name or service not known",
        "No address associated with hostname",
        "Name does not resolve",
        "Name has no usable address",
    ] {
        assert!(said(absent), "{absent}");
    }
    for transient in [
        "Temporary failure in name resolution",
        "Try again",
        "Non-recoverable failure in name resolution",
        "Non-recoverable error",
        "System error",
    ] {
        assert!(!said(transient), "{transient}");
    }
    assert!(!is_name_not_found(&io::Error::from(
        io::ErrorKind::TimedOut
    )));
}

#[test]
fn service_names_become_absolute_and_nothing_else_changes() {
    let domain = Some("cluster.local");
    assert_eq!(
        qualify("web-proxy-admin.default.svc:9901", domain),
        "web-proxy-admin.default.svc.cluster.local.:9901"
    );
    assert_eq!(
        qualify(
            "a.ns.svc:1, 10.0.0.5:9901,[::1]:9901",
            Some("corp.example.")
        ),
        "a.ns.svc.corp.example.:1,10.0.0.5:9901,[::1]:9901"
    );
    for kept in [
        "web-proxy-admin.default.svc.cluster.local.:9901",
        "web-proxy-admin.default:9901",
        "proxy.example.com:9901",
        "localhost:9901",
    ] {
        assert_eq!(qualify(kept, domain), kept);
    }
    assert_eq!(
        qualify("web-proxy-admin.default.svc:9901", None),
        "web-proxy-admin.default.svc:9901"
    );
}

#[test]
fn the_cluster_domain_comes_from_kubelets_search_list() {
    let kubelet = "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                   nameserver 10.96.0.10\noptions ndots:5\n";
    assert_eq!(cluster_domain(kubelet).as_deref(), Some("cluster.local"));
    let custom = "nameserver 10.96.0.10\nsearch ns.svc.k8s.corp. svc.k8s.corp. k8s.corp.\n";
    assert_eq!(cluster_domain(custom).as_deref(), Some("k8s.corp"));
    // dnsPolicy: Default gets the node's resolv.conf.
    assert_eq!(
        cluster_domain("search ec2.internal\nnameserver 10.0.0.2\n"),
        None
    );
    assert_eq!(cluster_domain("nameserver 1.1.1.1\n"), None);
}

#[test]
fn a_refusal_is_never_done_and_an_unknown_pod_is() {
    let answer = |status: StatusCode, body: &'static str| {
        ReplicaState::from_answer(Ok((status, Bytes::from_static(body.as_bytes()))))
    };
    let refused = answer(
        StatusCode::FORBIDDEN,
        r#"{"error": "127.0.0.6 is not an endpoint of this proxy"}"#,
    );
    assert_eq!(
        refused,
        ReplicaState::Refused("127.0.0.6 is not an endpoint of this proxy".to_owned())
    );
    assert!(!refused.is_done());
    let unknown = answer(
        StatusCode::OK,
        r#"{"known": false, "in_flight": 0, "connections": 0}"#,
    );
    assert_eq!(unknown, ReplicaState::Unknown);
    assert!(unknown.is_done());
}
