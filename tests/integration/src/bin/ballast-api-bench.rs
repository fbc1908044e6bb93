#![forbid(unsafe_code)]
//! The load a `ballast-operator` binary puts on the API server: it runs the binary
//! against the list/watch/write API stand-in with N BalancedServices, acts as the
//! Deployment controller and kubelet (pods, ReplicaSets, Deployment status; every pod
//! Ready at once) and as the proxies (each BalancedService's proxy pods point at an
//! admin stand-in on its own loopback address that lists every app pod, as proxies do
//! once their watch caught up), and counts the requests the stand-in answers, per
//! BalancedService per minute: once settled, then while every BalancedService rolls out a
//! new revision one pod at a time. Prints one JSON line. A harness, never presented as a
//! cluster; what it leaves out (proxies, real probes) is the same for every binary run.

use ballast_api::BalancedService;
use ballast_api::admin::{EndpointReport, EndpointStatus};
use ballast_integration::Process;
use ballast_integration::apiserver::{ApiServer, ResourceType, Verb};
use clap::Parser;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;

const NAMESPACE: &str = "bench";

/// Runs an operator binary against the API stand-in and counts its requests.
#[derive(Debug, Parser)]
#[command(name = "ballast-api-bench")]
struct Args {
    /// The `ballast-operator` binary to measure.
    #[arg(long)]
    operator: String,
    /// A label for the output line.
    #[arg(long, default_value = "ballast")]
    label: String,
    /// BalancedServices (4 pods each).
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Seconds measured once everything settled.
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Seconds between two pod replacements of one Deployment during the rollout.
    #[arg(long, default_value_t = 5)]
    step_secs: u64,
    /// The sample BalancedService every one is made from.
    #[arg(long, default_value = "config/samples/demo-http.yaml")]
    sample: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ballast-api-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<Value, String> {
    let api = std::sync::Arc::new(
        ApiServer::start([127, 0, 0, 1].into())
            .await
            .map_err(|e| format!("starting the API stand-in: {e}"))?,
    );
    for resource in [
        ResourceType::of::<BalancedService>(),
        ResourceType::of::<Deployment>(),
        ResourceType::of::<ReplicaSet>(),
        ResourceType::of::<Pod>(),
        ResourceType::of::<Service>(),
        ResourceType::of::<ServiceAccount>(),
        ResourceType::of::<Role>(),
        ResourceType::of::<RoleBinding>(),
        ResourceType::of::<PodDisruptionBudget>(),
        ResourceType::of::<EndpointSlice>(),
        ResourceType::of::<Lease>(),
        ResourceType {
            api_version: "events.k8s.io/v1".into(),
            kind: "Event".into(),
            plural: "events".into(),
        },
    ] {
        api.serve_type(resource);
    }
    let sample: Value = serde_norway::from_str(
        &std::fs::read_to_string(&args.sample).map_err(|e| format!("{}: {e}", args.sample))?,
    )
    .map_err(|e| format!("{}: {e}", args.sample))?;
    let names: Vec<String> = (0..args.services).map(|i| format!("svc-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        start_admin(std::sync::Arc::clone(&api), name.clone(), proxy_ip(i)).await?;
    }
    for name in &names {
        let mut bs = sample.clone();
        bs["metadata"] = json!({"name": name, "namespace": NAMESPACE, "generation": 1});
        api.apply_value(bs)?;
    }
    let dir = std::env::temp_dir().join(format!("ballast-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NAMESPACE)
        .map_err(|e| e.to_string())?;
    let admin = format!(
        "127.0.0.1:{}",
        ballast_integration::free_port([127, 0, 0, 1])
    );
    let _operator = Process::spawn_with_env(
        &args.operator,
        &["run", "--namespace", NAMESPACE, "--admin-listen", &admin],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap_or_default())],
    );
    let mut cluster = Cluster::default();

    // Settle: every BalancedService applied, its pods Ready, its status written.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        cluster.step(&api, Duration::ZERO)?;
        let settled = names.iter().all(|n| {
            api.get::<BalancedService>(NAMESPACE, n)
                .and_then(|bs| bs.status)
                .is_some_and(|s| s.available_replicas == 4)
        });
        if settled {
            break;
        }
        if Instant::now() > deadline {
            return Err("the BalancedServices never became available".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let start-up work (first reads, first status writes) pass.
    tick(&mut cluster, &api, Duration::from_secs(10), Duration::ZERO).await?;

    let before = counts(&api);
    tick(
        &mut cluster,
        &api,
        Duration::from_secs(args.steady_secs),
        Duration::ZERO,
    )
    .await?;
    let steady = per_service_minute(
        &diff(&counts(&api), &before),
        args.services,
        args.steady_secs,
    );

    // Rollout: a new image for every BalancedService, one pod replaced per step.
    for name in &names {
        let mut bs = api
            .get_value(&ResourceType::of::<BalancedService>(), NAMESPACE, name)
            .ok_or("a BalancedService vanished")?;
        bs["spec"]["template"]["spec"]["containers"][0]["image"] =
            json!("ghcr.io/ballast-dev/demo-app:v2");
        let generation = bs["metadata"]["generation"].as_i64().unwrap_or(1);
        bs["metadata"]["generation"] = json!(generation + 1);
        api.apply_value(bs)?;
    }
    let before = counts(&api);
    let started = Instant::now();
    let step = Duration::from_secs(args.step_secs);
    let deadline = started + Duration::from_secs(600);
    loop {
        tick(&mut cluster, &api, Duration::from_secs(1), step).await?;
        let done = names.iter().all(|n| {
            api.get::<BalancedService>(NAMESPACE, n)
                .and_then(|bs| bs.status)
                .and_then(|s| s.last_rollout)
                .is_some_and(|r| r.finished_at.is_some())
        });
        if done || Instant::now() > deadline {
            break;
        }
    }
    let rollout_secs = started.elapsed().as_secs().max(1);
    let rollout = per_service_minute(&diff(&counts(&api), &before), args.services, rollout_secs);
    Ok(json!({
        "label": args.label,
        "services": args.services,
        "steady": steady,
        "rollout": rollout,
        "rollout_seconds": rollout_secs,
    }))
}

/// The loopback address of the `i`-th BalancedService's proxies.
fn proxy_ip(i: usize) -> std::net::Ipv4Addr {
    let i = u8::try_from(i % 250).unwrap_or(0);
    std::net::Ipv4Addr::new(127, 0, 1, i + 1)
}

/// A proxy's admin port, reduced to what the operator reads: `/endpoints` lists every
/// app pod of `service` as active, nothing in flight; `/drains` is empty.
async fn start_admin(
    api: std::sync::Arc<ApiServer>,
    service: String,
    ip: std::net::Ipv4Addr,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind((ip, 9901))
        .await
        .map_err(|e| format!("admin stand-in on {ip}:9901: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (api, service) = (std::sync::Arc::clone(&api), service.clone());
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let body = match req.uri().path() {
                        ballast_api::admin::ENDPOINTS => {
                            let pods: Vec<EndpointReport> = api
                                .list_values(&ResourceType::of::<Pod>(), NAMESPACE)
                                .into_iter()
                                .filter(|p| {
                                    let labels = &p["metadata"]["labels"];
                                    labels["ballast.dev/service"] == json!(service)
                                        && labels["ballast.dev/role"] == json!("app")
                                })
                                .filter_map(|p| {
                                    let ip: std::net::IpAddr =
                                        p["status"]["podIP"].as_str()?.parse().ok()?;
                                    Some(EndpointReport {
                                        pod: p["metadata"]["name"].as_str().map(str::to_owned),
                                        ..EndpointReport::new(
                                            (ip, 8080).into(),
                                            EndpointStatus::Active,
                                        )
                                    })
                                })
                                .collect();
                            serde_json::to_value(pods).unwrap_or_default()
                        }
                        _ => json!([]),
                    };
                    let bytes = bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    Ok(())
}

/// Runs the cluster stand-in for `length`, stepping every 200 ms.
async fn tick(
    cluster: &mut Cluster,
    api: &ApiServer,
    length: Duration,
    step: Duration,
) -> Result<(), String> {
    let end = Instant::now() + length;
    while Instant::now() < end {
        cluster.step(api, step)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn counts(api: &ApiServer) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in api.requests() {
        let verb = match r.verb {
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Get => "get",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::Other => "other",
        };
        // The bench's own writes go to the store directly, never over HTTP.
        let resource = r
            .path
            .split('/')
            .skip_while(|s| *s != "namespaces")
            .nth(2)
            .unwrap_or("other");
        let sub = if r.path.ends_with("/status") {
            "/status"
        } else {
            ""
        };
        *out.entry(format!("{verb} {resource}{sub}")).or_default() += 1;
    }
    out
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn per_service_minute(counts: &BTreeMap<String, u64>, services: usize, secs: u64) -> Value {
    let scale = 60.0 / (secs as f64) / (services as f64);
    let mut out = serde_json::Map::new();
    let mut total = 0.0;
    for (verb, n) in counts {
        let rate = (*n as f64) * scale;
        total += rate;
        out.insert(verb.clone(), json!((rate * 10.0).round() / 10.0));
    }
    out.insert("total".into(), json!((total * 10.0).round() / 10.0));
    Value::Object(out)
}

/// The Deployment controller and kubelet, reduced to what the operator reads: pods of
/// each app Deployment's revision (Ready at once), a ReplicaSet per revision, and the
/// Deployment's status.
#[derive(Debug, Default)]
struct Cluster {
    next_ip: u32,
    last_step: BTreeMap<String, Instant>,
}

impl Cluster {
    fn step(&mut self, api: &ApiServer, step: Duration) -> Result<(), String> {
        let deployments = api.list_values(&ResourceType::of::<Deployment>(), NAMESPACE);
        for deployment in deployments {
            let name = deployment["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let generation = deployment["metadata"]["generation"].clone();
            let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
            let labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
            let revision = labels["ballast.dev/revision"]
                .as_str()
                .unwrap_or("none")
                .to_owned();
            let pods: Vec<Value> = api
                .list_values(&ResourceType::of::<Pod>(), NAMESPACE)
                .into_iter()
                .filter(|p| p["metadata"]["labels"]["bench/deployment"] == json!(name))
                .collect();
            let old: Vec<&Value> = pods
                .iter()
                .filter(|p| p["metadata"]["labels"]["ballast.dev/revision"] != json!(revision))
                .collect();
            let new = pods.len() - old.len();
            let due = self
                .last_step
                .get(&name)
                .is_none_or(|at| at.elapsed() >= step);
            let is_app = labels["ballast.dev/role"] == json!("app");
            if !is_app && pods.len() < usize::try_from(replicas).unwrap_or(0) {
                let service = labels["ballast.dev/service"].as_str().unwrap_or_default();
                let index: usize = service.trim_start_matches("svc-").parse().unwrap_or(0);
                for k in pods.len()..usize::try_from(replicas).unwrap_or(0) {
                    api.apply_value(json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": format!("{name}-{k}"), "namespace": NAMESPACE,
                                     "labels": merge_labels(&labels, &name)},
                        "spec": deployment["spec"]["template"]["spec"].clone(),
                        "status": {"phase": "Running", "podIP": proxy_ip(index).to_string(),
                                   "conditions": [{"type": "Ready", "status": "True"}]},
                    }))?;
                }
            }
            if is_app && (pods.is_empty() || (due && (new as i64) < replicas)) {
                // Surge one new pod; then retire one old pod, as maxUnavailable 0 does.
                let missing = if pods.is_empty() { replicas } else { 1 };
                for _ in 0..missing {
                    self.next_ip += 1;
                    let pod = json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": format!("{name}-{}", self.next_ip),
                                     "namespace": NAMESPACE,
                                     "labels": merge_labels(&labels, &name)},
                        "spec": deployment["spec"]["template"]["spec"].clone(),
                        "status": {"phase": "Running",
                                   "podIP": format!("10.{}.{}.{}", self.next_ip >> 16 & 255,
                                                    self.next_ip >> 8 & 255, self.next_ip & 255),
                                   "conditions": [{"type": "Ready", "status": "True"}]},
                    });
                    api.apply_value(pod)?;
                }
                if let Some(victim) = old.first() {
                    let victim = victim["metadata"]["name"].as_str().unwrap_or_default();
                    api.delete::<Pod>(NAMESPACE, victim);
                }
                self.last_step.insert(name.clone(), Instant::now());
            }
            let pods_now: Vec<Value> = api
                .list_values(&ResourceType::of::<Pod>(), NAMESPACE)
                .into_iter()
                .filter(|p| p["metadata"]["labels"]["bench/deployment"] == json!(name))
                .collect();
            let total = i64::try_from(pods_now.len()).unwrap_or(0);
            let updated = i64::try_from(
                pods_now
                    .iter()
                    .filter(|p| p["metadata"]["labels"]["ballast.dev/revision"] == json!(revision))
                    .count(),
            )
            .unwrap_or(0);
            let ready = if is_app { total } else { replicas };
            let status = json!({
                "observedGeneration": generation,
                "replicas": if is_app { total } else { replicas },
                "updatedReplicas": if is_app { updated } else { replicas },
                "readyReplicas": ready,
                "availableReplicas": ready,
            });
            if deployment["status"] != status {
                let mut d = deployment.clone();
                d["status"] = status;
                api.apply_value(d)?;
            }
            if is_app {
                let rs_name = format!("{name}-{revision}");
                if api.get::<ReplicaSet>(NAMESPACE, &rs_name).is_none() {
                    api.apply_value(json!({
                        "apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "metadata": {"name": rs_name, "namespace": NAMESPACE, "labels": labels},
                        "spec": {"selector": deployment["spec"]["selector"].clone(),
                                 "template": deployment["spec"]["template"].clone()},
                        "status": {"replicas": updated, "availableReplicas": updated},
                    }))?;
                }
            }
        }
        Ok(())
    }
}

fn merge_labels(labels: &Value, deployment: &str) -> Value {
    let mut out = labels.clone();
    out["bench/deployment"] = json!(deployment);
    out
}
