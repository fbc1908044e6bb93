//! Adopting a running Deployment and its Service, on the local cluster stand-in, under
//! load: a plain Deployment `web` (no drain gate, an app that exits at once on SIGTERM)
//! behind its plain Service `web` is adopted by a BalancedService with `workloadRef`
//! and `service.adopt`. The proxies start, the Service switches to them once
//! [`adopt::ready_to_switch`] says so, ballast's fields are merged into the Deployment
//! (the API server's server-side apply, [`crate::apiserver::merge`]), and the first
//! rollout replaces every old pod, with the operator's own [`adopt::guard`] retiring
//! and draining each old pod before the Deployment controller deletes it, and
//! [`gate::decide_all`] opening the new pods' gates only as far as the guard allows.
//!
//! `Unguarded` is the same adoption with gates that open as soon as every proxy lists
//! the pod (the drain gate alone): the old pods, which have no preStop hook, are then
//! deleted with requests still in flight on them.

use crate::apiserver::ApiServer;
use crate::apiserver::merge::merge;
use crate::cluster::Deployment;
use crate::cluster::feed::{EndpointFeed, SliceWriter};
use crate::cluster::operator::{app_pod, ready_proxies};
use crate::cluster::plan::DeploymentPlan;
use crate::l4::L4Balancer;
use crate::load::{Load, LoadPlan, LoadStats};
use crate::lock;
use crate::scenario::{ScenarioConfig, runtime};
use ballast_api::BalancedService;
use ballast_operator::adopt;
use ballast_operator::build::{BuildContext, build};
use ballast_operator::gate;
use ballast_operator::observe::{AppPod, ProxyReader, ROUTABLE_CONDITION};
use ballast_operator::validate::{Limits, validate};
use k8s_openapi::api::apps::v1::Deployment as K8sDeployment;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the first rollout's gates open, and how the app stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptVariant {
    /// As the operator does: each old pod retired and drained before a gate opens; the
    /// app exits at once on SIGTERM.
    Guarded,
    /// Gates open as soon as every proxy lists the new pod; the app exits at once.
    Unguarded,
    /// As the operator does, with an app that finishes its requests on SIGTERM.
    GuardedGracefulApp,
}

impl AdoptVariant {
    /// For tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Guarded => "ballast, naive app",
            Self::Unguarded => "gate only, naive app",
            Self::GuardedGracefulApp => "ballast, graceful app",
        }
    }

    fn guarded(self) -> bool {
        self != Self::Unguarded
    }

    fn shutdown(self) -> &'static str {
        match self {
            Self::GuardedGracefulApp => "graceful",
            Self::Guarded | Self::Unguarded => "naive",
        }
    }
}

/// What an adoption did.
#[derive(Clone, Debug)]
pub struct AdoptionReport {
    /// How the gates opened.
    pub variant: AdoptVariant,
    /// From the start of the load until the Service was switched to the proxies.
    pub switched_after: Duration,
    /// From the switch until the last old pod stopped.
    pub first_rollout: Duration,
    /// Old pods replaced.
    pub old_pods: usize,
    /// Old pods retired before their deletion.
    pub retired: usize,
    /// Requests the proxies sent again after their pod closed or reset the connection
    /// before any response byte: a pod that exits mid-request (no drain gate) makes
    /// them, and the pod may have acted on the request it did not answer.
    pub retries: u64,
    /// What the clients of short requests saw, from before the adoption to after the
    /// first rollout; marked at the switch (connections opened before it go straight to
    /// the pods, as conntrack keeps them).
    pub load: LoadStats,
    /// What the clients of long requests saw: they start after the switch, so all their
    /// requests go through the proxies.
    pub long: LoadStats,
}

/// The plain Deployment and Service a user runs, and the BalancedService adopting them.
/// `shutdown` is the sample app's behaviour on SIGTERM (`naive`, `graceful`).
pub fn adoption_yaml(pods: u32, shutdown: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: {pods}
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
        - name: app
          image: ghcr.io/ballast-dev/demo-app:latest
          args: ["--listen", "0.0.0.0:8080", "--latency-ms", "2", "--shutdown", "{shutdown}"]
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          ports:
            - name: http
              containerPort: 8080
          readinessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 1
            failureThreshold: 1
---
apiVersion: ballast.dev/v1alpha1
kind: BalancedService
metadata:
  name: web
  namespace: default
spec:
  workloadRef:
    apiVersion: apps/v1
    kind: Deployment
    name: web
  service:
    adopt: true
  ports:
    - name: http
      port: 80
      targetPort: http
  rollout:
    maxSurge: 1
    maxUnavailable: 0
    drainTimeoutSeconds: 10
    shutdownGraceSeconds: 5
    warmupSeconds: 1
  proxy:
    replicas: 2
"#
    )
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Runs one adoption under load.
///
/// # Errors
/// When the stand-in cannot run it, the Service never switches or the first rollout
/// does not finish. Failed requests are not errors: they are in the report.
pub async fn run(cfg: &ScenarioConfig, variant: AdoptVariant) -> Result<AdoptionReport, String> {
    for program in ["ballast-proxy", "ballast-drain", "ballast-sample-app"] {
        if !cfg.bin_dir.join(program).exists() {
            return Err(format!(
                "{} is missing: build it first (cargo build --locked --workspace --bins)",
                cfg.bin_dir.join(program).display()
            ));
        }
    }
    std::fs::create_dir_all(cfg.work_dir.join("logs")).map_err(|e| e.to_string())?;
    let yaml = adoption_yaml(cfg.pods, variant.shutdown());
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(&yaml) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).map_err(|e| e.to_string())?;
        documents.push(value);
    }
    let user_json = documents[0].clone();
    let user: K8sDeployment =
        serde_json::from_value(user_json.clone()).map_err(|e| e.to_string())?;
    let bs: BalancedService =
        serde_json::from_value(documents[1].clone()).map_err(|e| e.to_string())?;
    let valid = validate(&bs, Some(&user), &Limits::default()).map_err(|e| e.to_string())?;
    let owned = build(
        &valid,
        &BuildContext {
            proxy_image: "ghcr.io/ballast-dev/ballast:dev".to_owned(),
            operator_namespace: "ballast-system".to_owned(),
        },
    );
    let admin_port = u16::try_from(bs.spec.proxy.admin_port).map_err(|e| e.to_string())?;
    let net = cfg.net;

    let api_ip = Ipv4Addr::new(127, net, 4, 1);
    let api = Arc::new(
        ApiServer::start(api_ip.into())
            .await
            .map_err(|e| format!("API stand-in on {api_ip}: {e}"))?,
    );
    let kubeconfig = cfg.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "default")
        .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let proxies_slot = Arc::new(Mutex::new(None));
    let runtime = runtime(cfg, Arc::clone(&proxies_slot), &kubeconfig);

    // The user's Deployment, running before ballast, behind the user's Service. Its
    // pods' endpoints go to the backends Service's slices too: in a cluster that
    // Service appears with the proxies, over the same pods.
    let backends_feed = EndpointFeed::start(
        cfg.propagation,
        Some(SliceWriter::new(Arc::clone(&api), &owned.backends_service)?),
    );
    let app = Deployment::start(
        DeploymentPlan::from_deployment(&user)?,
        "default",
        runtime.clone(),
        [127, net, 1],
        backends_feed.clone(),
    );
    app.wait_rolled_out(Duration::from_secs(60)).await?;
    let proxy_feed = EndpointFeed::start(cfg.propagation, None);
    // The user's Service `web`: kube-proxy over the app pods until it is switched, then
    // over the proxies (connections opened before stay where they are, as conntrack
    // keeps them).
    let front_feed = EndpointFeed::start(Duration::ZERO, None);
    let switched = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forward = {
        let (app_rx, proxy_rx) = (backends_feed.subscribe(), proxy_feed.subscribe());
        let (front_feed, switched) = (front_feed.clone(), Arc::clone(&switched));
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let source = if switched.load(std::sync::atomic::Ordering::Relaxed) {
                    &proxy_rx
                } else {
                    &app_rx
                };
                let now = source.borrow().clone();
                if last.as_ref() != Some(&now) {
                    front_feed.publish(now.clone());
                    last = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let front_ip = Ipv4Addr::new(127, net, 3, 1);
    let front = L4Balancer::start((front_ip, 0).into(), front_feed.subscribe(), cfg.seed)
        .await
        .map_err(|e| format!("front Service on {front_ip}: {e}"))?;
    tokio::time::timeout(
        Duration::from_secs(30),
        front_feed
            .subscribe()
            .wait_for(|set| set.iter().filter(|e| e.ready).count() >= cfg.pods as usize),
    )
    .await
    .map_err(|_| "the user's Service did not list every pod".to_owned())?
    .map_err(|e| e.to_string())?;

    let load = Load::start(&LoadPlan::short(
        front.addr,
        cfg.rate,
        cfg.clients,
        cfg.seed,
        Duration::from_secs(150),
    ));
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The operator applies the proxies first.
    let proxies = Deployment::start(
        DeploymentPlan::from_deployment(&owned.proxy_deployment)?,
        "default",
        runtime.clone(),
        [127, net, 2],
        proxy_feed.clone(),
    );
    *lock(&proxies_slot) = Some(proxies.clone());
    proxies.wait_rolled_out(Duration::from_secs(30)).await?;
    // In a cluster the EndpointSlice controller computes the switched Service's
    // endpoints from the proxies' readiness when the selector changes; here the feed
    // over the proxies exists from their start, so let it catch up with them first.
    tokio::time::timeout(
        Duration::from_secs(30),
        proxy_feed.subscribe().wait_for(|set| {
            set.iter().filter(|e| e.ready).count()
                >= usize::try_from(bs.spec.proxy.replicas).unwrap_or(1)
        }),
    )
    .await
    .map_err(|_| "the proxies' endpoints did not become ready".to_owned())?
    .map_err(|e| e.to_string())?;

    let reader = ProxyReader::new(Duration::from_secs(2));
    let partial = serde_json::to_value(&owned.app_deployment).map_err(|e| e.to_string())?;
    let old: Vec<String> = app.pods().iter().map(|p| p.identity.name.clone()).collect();
    let mut switched_after = None;
    let mut long_load: Option<Load> = None;
    let mut switched_at = Instant::now();
    let limit = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > limit {
            return Err(format!(
                "the adoption did not finish: switched {:?}, {}",
                switched_after,
                app.describe()
            ));
        }
        let ready = ready_proxies(&proxies, admin_port);
        let observations = reader.observe(&ready).await;
        let pods = app.pods();
        let seen: Vec<AppPod> = pods.iter().map(|p| app_pod(p)).collect();
        if switched_after.is_none() {
            let wanted = bs.spec.proxy.replicas;
            let count = i32::try_from(ready.len()).unwrap_or(0);
            // Every pod of the stand-in is seen: the Deployment counts what `seen` holds.
            let counted = i32::try_from(seen.iter().filter(|p| p.ready).count()).unwrap_or(0);
            if adopt::ready_to_switch(count, wanted, "web", counted, &seen, &observations).is_ok() {
                switched.store(true, std::sync::atomic::Ordering::Relaxed);
                // kube-proxy's view of the Service moves to the proxies: connections
                // opened until then still go straight to a pod.
                let proxy_set = proxy_feed.subscribe().borrow().clone();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    front_feed.subscribe().wait_for(|set| *set == proxy_set),
                )
                .await
                .map_err(|_| "the user's Service did not switch to the proxies".to_owned())?
                .map_err(|e| e.to_string())?;
                load.mark();
                switched_after = Some(load_started.elapsed());
                // Long requests, through the proxies (their connections are opened
                // now): what an old pod without a drain gate loses when it exits.
                long_load = Some(Load::start(&LoadPlan {
                    long_clients: 2,
                    long_ms: 500..=2500,
                    long_pause: Duration::from_millis(100),
                    ..LoadPlan::short(front.addr, 1, 0, cfg.seed + 7, Duration::from_secs(150))
                }));
                if let Some(long) = &long_load {
                    long.set_long_requests(true);
                }
                switched_at = Instant::now();
                // Then ballast's fields go onto the Deployment: the first rollout.
                let merged: K8sDeployment = serde_json::from_value(merge(&user_json, &partial))
                    .map_err(|e| e.to_string())?;
                app.apply(DeploymentPlan::from_deployment(&merged)?);
            }
        } else {
            let guard = if variant.guarded() {
                adopt::guard(
                    i32::try_from(cfg.pods).unwrap_or(1),
                    0,
                    &seen,
                    &observations,
                    unix_now(),
                    i64::from(bs.spec.rollout.drain_timeout_seconds),
                )
            } else {
                adopt::Guard::default()
            };
            if let Some(name) = &guard.retire
                && let Some(pod) = pods.iter().find(|p| &p.identity.name == name)
            {
                pod.retire(unix_now());
            }
            for ((pod, view), verdict) in
                pods.iter()
                    .zip(&seen)
                    .zip(gate::decide_all(&seen, &observations, guard.open))
            {
                if let Some((value, _)) = gate::change(view, &verdict) {
                    pod.set_gate(ROUTABLE_CONDITION, value);
                }
            }
            let old_left = app.pods().iter().any(|p| old.contains(&p.identity.name));
            if !old_left && app.rolled_out() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first_rollout = switched_at.elapsed();
    let mut retries = 0;
    for proxy in proxies.pods() {
        retries +=
            proxy_retries(SocketAddr::new(IpAddr::V4(proxy.identity.ip), admin_port)).await?;
    }
    // The load runs on a little, through the proxies only.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = load.stop().await;
    let long = match long_load {
        Some(long) => long.stop().await,
        None => LoadStats::default(),
    };
    forward.abort();
    let retired = app
        .history()
        .iter()
        .filter(|p| old.contains(&p.identity.name) && p.retired().is_some())
        .count();
    drop(front);
    Ok(AdoptionReport {
        variant,
        switched_after: switched_after.unwrap_or_default(),
        first_rollout,
        old_pods: old.len(),
        retired,
        retries,
        load: stats,
        long,
    })
}

/// `ballast_retries_total` of the proxy whose admin listener is `admin`.
async fn proxy_retries(admin: SocketAddr) -> Result<u64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| format!("{admin}: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| format!("{admin}: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("{admin}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("ballast_retries_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| format!("{admin}: no ballast_retries_total in /metrics"))
}

/// The reports as a table: one row per variant. "direct" failures happened on
/// connections clients opened to the pods before the switch (which no proxy sees);
/// "proxied" ones on connections opened through the proxies.
pub fn table(reports: &[&AdoptionReport]) -> String {
    let mut out = format!(
        "{:<26} {:>9} {:>7} {:>8} {:>7} {:>8} {:>10} {:>10} {:>8} {:>8}\n",
        "adoption",
        "requests",
        "failed",
        "proxied",
        "direct",
        "re-sent",
        "long ok",
        "switch at",
        "rollout",
        "retired"
    );
    for r in reports {
        let direct = r.load.failed_on_earlier_connections();
        let failed = r.load.failures_total() + r.long.failures_total();
        out.push_str(&format!(
            "{:<26} {:>9} {:>7} {:>8} {:>7} {:>8} {:>10} {:>9.1}s {:>7.1}s {:>8}\n",
            r.variant.label(),
            r.load.sent + r.long.sent,
            failed,
            failed - direct,
            direct,
            r.retries,
            format!("{}/{}", r.long.long_ok, r.long.sent),
            r.switched_after.as_secs_f64(),
            r.first_rollout.as_secs_f64(),
            format!("{}/{}", r.retired, r.old_pods),
        ));
    }
    out
}
