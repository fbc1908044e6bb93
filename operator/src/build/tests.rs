use super::*;
use crate::fixtures::balanced_service;
use ballast_api::settings::{AffinitySettings, BackendProtocol, ProxySettings, SameSite};
use ballast_api::spec::AppProtocol;
use k8s_openapi::api::core::v1::{ContainerPort, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::time::Duration;

fn ctx() -> BuildContext {
    BuildContext {
        proxy_image: "ghcr.io/ballast-dev/ballast:test".to_owned(),
        operator_namespace: "ballast-system".to_owned(),
    }
}

/// `super::build` of a spec that must be valid.
fn build(bs: &BalancedService, ctx: &BuildContext) -> OwnedObjects {
    super::build(&valid(bs), ctx)
}

fn valid(bs: &BalancedService) -> ValidatedSpec<'_> {
    crate::validate::validate(bs, None, &crate::validate::Limits::default()).unwrap()
}

fn proxy_settings(bs: &BalancedService) -> ProxySettings {
    super::proxy_settings(&valid(bs))
}

fn slow_probes(bs: &BalancedService) -> Vec<String> {
    super::slow_probes(&valid(bs))
}

fn app_pod(objects: &OwnedObjects) -> PodSpec {
    objects
        .app_deployment
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap()
}

#[test]
fn every_object_is_owned_labelled_and_namespaced() {
    let objects = build(&balanced_service(), &ctx());
    let docs = objects.to_documents().unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "Deployment",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "NetworkPolicy"
        ],
        "apply order"
    );
    for doc in &docs {
        let meta = &doc["metadata"];
        assert_eq!(meta["namespace"], "shop", "{doc}");
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], MANAGER);
        assert_eq!(meta["labels"][SERVICE_LABEL], "demo");
        let owner = &meta["ownerReferences"][0];
        assert_eq!(
            (
                owner["kind"].as_str(),
                owner["name"].as_str(),
                owner["controller"].as_bool()
            ),
            (Some("BalancedService"), Some("demo"), Some(true))
        );
    }
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "demo-proxy",
            "demo-proxy",
            "demo-proxy",
            "demo-backends",
            "demo-proxy-admin",
            "demo-proxy",
            "demo",
            "demo",
            "demo",
            "demo-proxy",
            "demo-proxy"
        ]
    );
}

#[test]
fn app_deployment_gets_probes_grace_period_and_rollout_strategy() {
    let objects = build(&balanced_service(), &ctx());
    let spec = objects.app_deployment.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(4));
    let strategy = spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(strategy.max_surge, Some(IntOrString::String("25%".into())));
    assert_eq!(strategy.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(spec.progress_deadline_seconds, Some(600));
    assert_eq!(
        spec.min_ready_seconds,
        Some(10),
        "a pod counts as available once its 10 s warmup is over"
    );
    let pod = app_pod(&objects);
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(30 + 15),
        "drainTimeout + shutdownGrace"
    );
    let gates = pod.readiness_gates.clone().unwrap();
    assert_eq!(gates.len(), 1);
    assert_eq!(gates[0].condition_type, "ballast.dev/routable");
    // Probes go to the container serving the port, not the first one.
    assert!(pod.containers[0].readiness_probe.is_none());
    let app = &pod.containers[1];
    let readiness = app.readiness_probe.clone().unwrap();
    let get = readiness.http_get.unwrap();
    assert_eq!(
        (get.path.as_deref(), get.port),
        (Some("/healthz"), IntOrString::Int(8080))
    );
    assert_eq!(
        (readiness.period_seconds, readiness.failure_threshold),
        (Some(2), Some(2))
    );
    let startup = app.startup_probe.clone().unwrap();
    assert_eq!(
        startup.failure_threshold,
        Some(150),
        "300 s startup budget / 2 s period"
    );
}

#[test]
fn a_users_readiness_gates_are_kept_and_ours_added_once() {
    let mut bs = balanced_service();
    bs.spec.rollout.min_ready_seconds = 45;
    let theirs = |t: &str| k8s_openapi::api::core::v1::PodReadinessGate {
        condition_type: t.to_owned(),
    };
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .readiness_gates = Some(vec![
        theirs("example.com/warm"),
        theirs("ballast.dev/routable"),
    ]);
    let objects = build(&bs, &ctx());
    assert_eq!(
        objects
            .app_deployment
            .spec
            .clone()
            .unwrap()
            .min_ready_seconds,
        Some(45)
    );
    let gates = app_pod(&objects).readiness_gates.clone().unwrap();
    assert_eq!(
        gates,
        [theirs("example.com/warm"), theirs("ballast.dev/routable")]
    );
}

#[test]
fn grace_period_follows_the_rollout_settings() {
    let mut bs = balanced_service();
    bs.spec.rollout.drain_timeout_seconds = 90;
    bs.spec.rollout.shutdown_grace_seconds = 0;
    assert_eq!(
        app_pod(&build(&bs, &ctx())).termination_grace_period_seconds,
        Some(90)
    );
}

#[test]
fn user_probes_are_kept_and_slow_ones_reported() {
    let mut bs = balanced_service();
    let own = Probe {
        period_seconds: Some(30),
        tcp_socket: None,
        ..Probe::default()
    };
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[1]
        .readiness_probe = Some(own.clone());
    let pod = app_pod(&build(&bs, &ctx()));
    assert_eq!(pod.containers[1].readiness_probe, Some(own));
    assert!(pod.containers[1].startup_probe.is_none());
    assert_eq!(slow_probes(&bs), vec!["app".to_owned()]);
    assert!(slow_probes(&balanced_service()).is_empty());
}

#[test]
fn grpc_ports_get_grpc_probes_and_an_h2c_proxy() {
    let mut bs = balanced_service();
    bs.spec.ports[0].app_protocol = AppProtocol::Grpc;
    let objects = build(&bs, &ctx());
    let probe = app_pod(&objects).containers[1]
        .readiness_probe
        .clone()
        .unwrap();
    assert_eq!(probe.grpc.unwrap().port, 8080);
    assert_eq!(
        proxy_settings(&bs).listeners[0].protocol,
        BackendProtocol::H2c
    );
    let front = objects.front_service.spec.unwrap().ports.unwrap();
    assert_eq!(front[0].app_protocol.as_deref(), Some("grpc"));
}

#[test]
fn a_grpc_probe_on_a_named_port_uses_the_container_port() {
    let mut bs = balanced_service();
    bs.spec.ports[0].app_protocol = AppProtocol::Grpc;
    bs.spec.ports[0].target_port = Some(IntOrString::String("http".into()));
    let probe = |bs: &BalancedService| {
        app_pod(&build(bs, &ctx())).containers[1]
            .readiness_probe
            .clone()
            .unwrap()
            .grpc
            .unwrap()
            .port
    };
    // The Service port is 80; the container serves on 8080.
    assert_eq!(probe(&bs), 8080);
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[1]
        .ports
        .as_mut()
        .unwrap()
        .push(ContainerPort {
            name: Some("health".into()),
            container_port: 9090,
            ..ContainerPort::default()
        });
    bs.spec.probes.port = Some(IntOrString::String("health".into()));
    assert_eq!(probe(&bs), 9090);
}

#[test]
fn pod_labels_select_app_pods_and_carry_the_revision() {
    let bs = balanced_service();
    let objects = build(&bs, &ctx());
    let spec = objects.app_deployment.spec.unwrap();
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(
        labels["app.kubernetes.io/name"], "demo",
        "the user's labels stay"
    );
    assert_eq!(labels[ROLE_LABEL], "app");
    assert_eq!(
        labels[REVISION_LABEL],
        template_revision(bs.spec.template.as_ref().unwrap())
    );
    let selector = spec.selector.match_labels.unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let backends = objects.backends_service.spec.unwrap();
    assert_eq!(backends.selector.unwrap(), selector);
    assert_eq!(backends.cluster_ip.as_deref(), Some("None"));

    let mut changed = bs.clone();
    changed
        .spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[1]
        .image = Some("demo:2".into());
    assert_ne!(
        template_revision(changed.spec.template.as_ref().unwrap()),
        template_revision(bs.spec.template.as_ref().unwrap())
    );
}

#[test]
fn proxy_runs_restricted_watches_the_backends_and_is_found_by_the_drain_helper() {
    let objects = build(&balanced_service(), &ctx());
    let pod = objects
        .proxy_deployment
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/ballast-dev/ballast:test")
    );
    let args = container.args.clone().unwrap();
    for want in [
        "--kube-service=demo-backends",
        "--port=http=[::]:8080,protocol=http1",
        "--admin-listen=[::]:9901",
        "--drain-ttl=60s",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} in {args:?}");
    }
    // Workers follow the proxy's CPU request, handed over by the downward API.
    let cpu = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "BALLAST_CPU_REQUEST_MILLIS")
        .and_then(|e| e.value_from.clone())
        .and_then(|v| v.resource_field_ref)
        .unwrap();
    assert_eq!(
        (cpu.container_name.as_deref(), cpu.resource.as_str()),
        (Some("proxy"), "requests.cpu")
    );
    assert_eq!(cpu.divisor, Some(Quantity("1m".into())));
    // No mesh sidecar may hide the drain caller's address from the proxy.
    let meta = build(&balanced_service(), &ctx())
        .proxy_deployment
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap();
    let annotations = meta.annotations.unwrap();
    assert_eq!(annotations["sidecar.istio.io/inject"], "false");
    assert_eq!(annotations["linkerd.io/inject"], "disabled");
    assert_eq!(meta.labels.unwrap()["sidecar.istio.io/inject"], "false");
    let security = container.security_context.clone().unwrap();
    assert_eq!(
        (
            security.run_as_non_root,
            security.read_only_root_filesystem,
            security.allow_privilege_escalation
        ),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("demo-proxy"));
    assert_eq!(pod.topology_spread_constraints.unwrap().len(), 2);
    let rules = objects.proxy_role.rules.unwrap();
    assert_eq!(rules[0].verbs, ["get", "list", "watch"], "read-only");
    let admin = objects.proxy_admin_service.spec.unwrap();
    assert_eq!(admin.publish_not_ready_addresses, Some(true));
    assert_eq!(admin.cluster_ip.as_deref(), Some("None"));
    let front = objects.front_service.spec.unwrap();
    assert_eq!(front.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(front.ports.unwrap()[0].port, 80);
}

#[test]
fn disruption_budgets() {
    let bs = balanced_service();
    let objects = build(&bs, &ctx());
    let app = objects.app_pdb.unwrap().spec.unwrap();
    assert_eq!(
        (app.min_available, app.max_unavailable),
        (None, Some(IntOrString::Int(1)))
    );
    assert_eq!(
        app.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    let mut custom = bs.clone();
    custom.spec.disruption.min_available = Some(IntOrString::String("50%".into()));
    let app = build(&custom, &ctx()).app_pdb.unwrap().spec.unwrap();
    assert_eq!(
        (app.min_available, app.max_unavailable),
        (Some(IntOrString::String("50%".into())), None)
    );
}

#[test]
fn render_without_a_uid_has_no_owner_reference() {
    let mut bs = balanced_service();
    bs.metadata.uid = None;
    let docs = build(&bs, &ctx()).to_documents().unwrap();
    assert!(
        docs.iter()
            .all(|d| d["metadata"].get("ownerReferences").is_none())
    );
}

#[test]
fn the_drain_gate_is_installed_by_an_init_container_and_runs_in_the_serving_container() {
    let objects = build(&balanced_service(), &ctx());
    let pod = app_pod(&objects);
    let init = &pod.init_containers.clone().unwrap()[0];
    assert_eq!(
        init.image.as_deref(),
        Some("ghcr.io/ballast-dev/ballast:test")
    );
    assert_eq!(
        init.command.clone().unwrap(),
        ["/usr/local/bin/ballast-drain", "install", DRAIN_BIN_DIR]
    );
    assert!(
        pod.volumes
            .clone()
            .unwrap()
            .iter()
            .any(|v| v.name == "ballast-bin" && v.empty_dir.is_some())
    );
    assert!(
        pod.containers[0].lifecycle.is_none(),
        "the sidecar is left alone"
    );
    let app = &pod.containers[1];
    let hook = app
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .exec
        .unwrap()
        .command
        .unwrap();
    assert_eq!(
        hook,
        [
            "/ballast/bin/ballast-drain",
            "--proxies=demo-proxy-admin.shop.svc:9901",
            "--timeout=30s"
        ]
    );
    let mount = &app.volume_mounts.clone().unwrap()[0];
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        (DRAIN_BIN_DIR, Some(true))
    );
}

#[test]
fn a_users_own_pre_stop_runs_after_the_drain() {
    use k8s_openapi::api::core::v1::{ExecAction, Lifecycle, LifecycleHandler, SleepAction};
    let mut bs = balanced_service();
    let exec = LifecycleHandler {
        exec: Some(ExecAction {
            command: Some(vec!["/bin/flush-cache".into(), "--now".into()]),
        }),
        ..LifecycleHandler::default()
    };
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[1]
        .lifecycle = Some(Lifecycle {
        pre_stop: Some(exec),
        ..Lifecycle::default()
    });
    let pod = app_pod(&build(&bs, &ctx()));
    let hook = pod.containers[1]
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .exec
        .unwrap()
        .command
        .unwrap();
    assert_eq!(&hook[3..], ["--", "/bin/flush-cache", "--now"]);

    let sleep = LifecycleHandler {
        sleep: Some(SleepAction { seconds: 5 }),
        ..LifecycleHandler::default()
    };
    bs.spec
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[1]
        .lifecycle = Some(Lifecycle {
        pre_stop: Some(sleep),
        ..Lifecycle::default()
    });
    let pod = app_pod(&build(&bs, &ctx()));
    let hook = pod.containers[1]
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .exec
        .unwrap()
        .command
        .unwrap();
    assert_eq!(hook.last().map(String::as_str), Some("--then-sleep=5s"));
}

#[test]
fn affinity_becomes_proxy_flags() {
    use ballast_api::spec::{AffinityCookie, AffinitySpec, AffinityType};
    let mut bs = balanced_service();
    assert_eq!(proxy_settings(&bs).affinity, None, "off by default");
    bs.spec.balancing.affinity = Some(AffinitySpec {
        type_: AffinityType::Cookie,
        header: None,
        cookie: AffinityCookie {
            name: "cart".into(),
            ttl_seconds: 600,
            secure: true,
            same_site: ballast_api::spec::SameSite::Strict,
        },
        trust_forwarded_for: false,
        load_factor_percent: 150,
    });
    assert_eq!(
        proxy_settings(&bs).affinity,
        Some(AffinitySettings {
            key: "cookie:cart".to_owned(),
            load_factor: 1.5,
            cookie_ttl: Duration::from_secs(600),
            cookie_secure: true,
            cookie_same_site: SameSite::Strict,
            trust_forwarded_for: false,
        })
    );
}

#[test]
fn the_proxy_settings_follow_the_spec_and_the_proxy_accepts_them() {
    use clap::Parser;
    let mut bs = balanced_service();
    bs.spec.balancing.timeouts.stream_idle_seconds = 120;
    bs.spec.balancing.timeouts.response_seconds = 0;
    bs.spec.balancing.retries.body_limit_bytes = 4096;
    bs.spec.balancing.outlier_detection.max_ejection_seconds = 1;
    bs.spec.proxy.max_in_flight = 500;
    bs.spec.proxy.admin_port = 9000;
    let settings = proxy_settings(&bs);
    assert_eq!(settings.stream_idle_timeout, Some(Duration::from_secs(120)));
    assert_eq!(settings.response_timeout, None, "0 is no limit");
    assert_eq!(settings.retries.body_limit, 4096);
    assert_eq!(settings.max_in_flight, Some(500));
    assert_eq!(settings.admin_listen, "[::]:9000".parse().unwrap());
    assert_eq!(
        settings.outlier.max_ejection, settings.outlier.base_ejection,
        "never shorter than the first ejection"
    );
    assert_eq!(
        settings.drain_ttl,
        Duration::from_secs(60),
        "2 x drainTimeout"
    );
    assert_eq!(settings.kube_service, "demo-backends");
    // The proxy's own tests check every setting round-trips; this checks the operator's
    // rendering of a real spec is accepted as a whole.
    let args = settings.to_args();
    let parsed = ballast_proxy::config::Settings::try_parse_from(
        std::iter::once("ballast-proxy".to_owned()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("the proxy refuses the operator's arguments {args:?}: {e}"));
    let config = parsed
        .resolve()
        .unwrap_or_else(|e| panic!("the proxy refuses the operator's arguments {args:?}: {e}"));
    assert_eq!(config.max_in_flight, Some(500));
    assert_eq!(config.response_timeout, None);
}

#[test]
fn two_ports_make_two_listeners_and_two_ports_on_each_service() {
    let mut bs = balanced_service();
    let mut grpc = bs.spec.ports[0].clone();
    grpc.name = "grpc".into();
    grpc.port = 9090;
    grpc.target_port = Some(IntOrString::Int(50051));
    grpc.app_protocol = AppProtocol::Grpc;
    bs.spec.ports.push(grpc);
    let objects = build(&bs, &ctx());

    let args = proxy_settings(&bs).to_args();
    let listeners: Vec<&String> = args.iter().filter(|a| a.starts_with("--port=")).collect();
    assert_eq!(
        listeners,
        [
            "--port=http=[::]:8080,protocol=http1",
            "--port=grpc=[::]:8081,protocol=h2c"
        ]
    );
    let container = &objects
        .proxy_deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0];
    let container_ports: Vec<(Option<&str>, i32)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(
        container_ports,
        [
            (Some("http"), 8080),
            (Some("grpc"), 8081),
            (Some("admin"), 9901)
        ]
    );

    let ports = |service: Service| -> Vec<(String, i32, IntOrString, String)> {
        service
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| {
                (
                    p.name.unwrap(),
                    p.port,
                    p.target_port.unwrap(),
                    p.app_protocol.unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        ports(objects.front_service),
        [
            // By number: older proxy pods named their one client port `proxy`.
            (
                "http".to_owned(),
                80,
                IntOrString::Int(8080),
                "http".to_owned()
            ),
            (
                "grpc".to_owned(),
                9090,
                IntOrString::Int(8081),
                "grpc".to_owned()
            ),
        ]
    );
    assert_eq!(
        ports(objects.backends_service),
        [
            (
                "http".to_owned(),
                80,
                IntOrString::Int(8080),
                "http".to_owned()
            ),
            (
                "grpc".to_owned(),
                9090,
                IntOrString::Int(50051),
                "grpc".to_owned()
            ),
        ]
    );
    // The generated probes still go to the first port, over HTTP.
    let probe = app_pod(&build(&bs, &ctx())).containers[1]
        .readiness_probe
        .clone()
        .unwrap();
    assert!(probe.grpc.is_none());
    assert_eq!(probe.http_get.unwrap().port, IntOrString::Int(8080));
}
