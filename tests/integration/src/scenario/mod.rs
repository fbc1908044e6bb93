//! The rollout scenario, on the local cluster stand-in: 8 app pods (naive: they exit at
//! once on SIGTERM), keep-alive load at a fixed rate and WebSocket sessions (3 s each,
//! and one that lasts until it is cut), a full rollout to a new revision, then a rollout
//! of the proxy replicas. During the rollouts two more connections send long requests
//! (1-5 s) back to back: each one holds the drain of its pod. They are left out of the
//! steady windows before and after, where the balance is measured: a long request in
//! flight makes a latency-aware balancer avoid its pod, which a request-count figure
//! would count as imbalance.
//!
//! Three variants run the same load and the same rollout:
//!
//! * [`Variant::Ballast`]: the objects the operator builds for a BalancedService: the
//!   drain-gated preStop, the readiness gate, 2 proxy replicas behind the front
//!   Service (a kube-proxy stand-in), per-request balancing;
//! * [`Variant::KubernetesDefaults`]: the same app as a plain Deployment (its readiness
//!   probe kept; no preStop, no gate, default strategy and grace period) behind a
//!   kube-proxy stand-in that balances per connection;
//! * [`Variant::SleepInsteadOfGate`]: ballast, but with the usual cure,
//!   `preStop: sleep N`, in place of the drain gate.

use crate::lock;
use ballast_api::BalancedService;
use ballast_api::spec::PauseThresholds;
use ballast_api::status::RolloutSummary;
use ballast_operator::build::{BuildContext, OwnedObjects, build};
use ballast_operator::validate::{Limits, validate};
use k8s_openapi::api::apps::v1::Deployment as K8sDeployment;
use k8s_openapi::api::core::v1::{LifecycleHandler, SleepAction};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crate::apiserver::{ApiServer, Verb};
use crate::cluster::feed::{EndpointFeed, SliceWriter};
use crate::cluster::operator::{self, StatusView};
use crate::cluster::plan::DeploymentPlan;
use crate::cluster::pod::{ArgRewrite, PodIdentity, PodRuntime};
use crate::cluster::{Deployment, pod::Pod};
use crate::l4::L4Balancer;
use crate::load::{Load, LoadPlan, LoadStats};
pub use crate::workspace_bin_dir as bin_dir_of_current_exe;
pub use table::{MAX_WIDTH, table};

mod table;

/// The proxies' admin port in the generated spec.
const ADMIN_PORT: u16 = 9901;
/// Longest a rollout may take before the scenario gives up.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(150);

/// Which setup runs the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// What the operator builds.
    Ballast,
    /// A plain Deployment behind kube-proxy.
    KubernetesDefaults,
    /// ballast with `preStop: sleep N` (seconds) instead of the drain gate.
    SleepInsteadOfGate(u64),
}

impl Variant {
    /// Short name for tables.
    pub fn label(&self) -> String {
        match self {
            Self::Ballast => "ballast".to_owned(),
            Self::KubernetesDefaults => "kubernetes defaults".to_owned(),
            Self::SleepInsteadOfGate(s) => format!("preStop sleep {s}"),
        }
    }

    fn has_proxies(self) -> bool {
        self != Self::KubernetesDefaults
    }
}

/// Knobs of a run.
#[derive(Clone, Debug)]
pub struct ScenarioConfig {
    /// App pods.
    pub pods: u32,
    /// Short requests per second.
    pub rate: u32,
    /// Keep-alive connections carrying them.
    pub clients: u32,
    /// Seed (kube-proxy's picks, long requests' durations).
    pub seed: u64,
    /// EndpointSlice propagation delay.
    pub propagation: Duration,
    /// Steady load before and after the rollout (balance is measured in it).
    pub steady: Duration,
    /// Also roll the proxy replicas.
    pub proxy_rollout: bool,
    /// Directory holding `ballast-proxy`, `ballast-drain`, `ballast-sample-app`.
    pub bin_dir: PathBuf,
    /// Scratch directory (kubeconfig, pod logs); created.
    pub work_dir: PathBuf,
    /// Which `127.N.*.*` range the run's addresses come from (runs at once need
    /// different ones).
    pub net: u8,
}

impl ScenarioConfig {
    /// Defaults: 8 pods, 500 req/s on 8 connections, 1 s propagation, 10 s steady.
    pub fn new(bin_dir: PathBuf, work_dir: PathBuf, net: u8) -> Self {
        Self {
            pods: 8,
            rate: 500,
            clients: 8,
            seed: 1,
            propagation: Duration::from_secs(1),
            steady: Duration::from_secs(10),
            proxy_rollout: true,
            bin_dir,
            work_dir,
            net,
        }
    }
}

/// The outcome of one variant.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    /// Which variant.
    pub variant: Variant,
    /// What the clients saw.
    pub load: LoadStats,
    /// How long the load ran, from its start until it was stopped (each variant runs
    /// as long as its rollouts take).
    pub load_time: Duration,
    /// Busiest pod's share over the mean, steady load before the rollout.
    pub balance_before: Option<f64>,
    /// The same after it (new pods).
    pub balance_after: Option<f64>,
    /// From the new template until the last old pod stopped.
    pub rollout: Duration,
    /// From the new template until the Deployment was complete (every new pod
    /// available, no old pod left active).
    pub rollout_available: Duration,
    /// Old pods that stopped.
    pub pods_replaced: usize,
    /// Old pods killed at the grace period.
    pub pods_killed: usize,
    /// Longest preStop hook (a drain, or the sleep).
    pub longest_pre_stop: Duration,
    /// The proxies' rollout, when done.
    pub proxy_rollout: Option<Duration>,
    /// What status would say (ballast and sleep variants).
    pub status: Option<RolloutSummary>,
    /// Events the operator would have emitted.
    pub events: Vec<String>,
    /// What the API stand-in answered: the proxies' EndpointSlice lists and watches.
    pub api: ApiRequests,
}

/// Requests the API stand-in answered during a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiRequests {
    /// LISTs answered 200.
    pub lists: usize,
    /// WATCHes started.
    pub watches: usize,
    /// Requests answered with an error.
    pub failed: usize,
}

/// One pod in the live view.
#[derive(Clone, Debug)]
pub struct PodLine {
    /// Pod name.
    pub name: String,
    /// Runs the revision being rolled out.
    pub new: bool,
    /// Ready.
    pub ready: bool,
    /// Being deleted.
    pub terminating: bool,
}

/// What a live view shows of a running variant.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// What the scenario is doing.
    pub phase: String,
    /// The clients' counts.
    pub load: LoadStats,
    /// App pods.
    pub pods: Vec<PodLine>,
    /// Old pods stopped / replicas, during the app rollout.
    pub replaced: (usize, u32),
    /// Proxy replicas ready / existing.
    pub proxies: (usize, usize),
    /// Draining pods as status would list them: (pod, in flight, connections).
    pub draining: Vec<(String, i64, i64)>,
    /// Set when the variant finished.
    pub report: Option<ScenarioReport>,
    /// Set when it failed.
    pub error: Option<String>,
}

/// Shared handle a view reads.
pub type LiveHandle = Arc<Mutex<Live>>;

/// The demo's BalancedService: `pods` naive sample-app pods, short timeouts so a demo
/// rollout is quick. `release` goes into a template annotation: changing it is a new
/// revision. `proxy_cpu` is the proxies' CPU request: changing it rolls the proxies.
pub fn demo_service(pods: u32, release: u32, proxy_cpu: &str) -> String {
    format!(
        r#"apiVersion: ballast.dev/v1alpha1
kind: BalancedService
metadata:
  name: demo
  namespace: default
spec:
  replicas: {pods}
  ports:
    - name: http
      port: 80
      targetPort: 8080
  probes:
    path: /healthz
    periodSeconds: 1
    failureThreshold: 1
  rollout:
    maxSurge: 25%
    maxUnavailable: 0
    drainTimeoutSeconds: 8
    shutdownGraceSeconds: 5
    warmupSeconds: 2
  proxy:
    replicas: 2
    resources:
      requests:
        cpu: {proxy_cpu}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: demo
      annotations:
        demo.ballast.dev/release: "{release}"
    spec:
      containers:
        - name: app
          image: ghcr.io/ballast-dev/demo-app:latest
          args: ["--listen", "0.0.0.0:8080", "--latency-ms", "2", "--shutdown", "naive"]
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          ports:
            - name: http
              containerPort: 8080
"#
    )
}

/// Everything the operator builds for `yaml`.
///
/// # Errors
/// When the YAML is not a valid BalancedService.
pub fn operator_objects(yaml: &str) -> Result<OwnedObjects, String> {
    let bs: BalancedService = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
    let valid = validate(&bs, None, &Limits::default()).map_err(|e| e.to_string())?;
    Ok(build(
        &valid,
        &BuildContext {
            proxy_image: "ghcr.io/ballast-dev/ballast:dev".to_owned(),
            operator_namespace: "ballast-system".to_owned(),
        },
    ))
}

/// The same app as a plain Deployment with Kubernetes defaults for everything ballast
/// sets: no preStop, no readiness gate, no drain helper, default strategy (25% / 25%),
/// minReadySeconds and grace period (30 s). The readiness probe is kept.
pub fn kubernetes_defaults(generated: &K8sDeployment) -> K8sDeployment {
    let mut d = generated.clone();
    if let Some(spec) = d.spec.as_mut() {
        spec.strategy = None;
        spec.min_ready_seconds = None;
        if let Some(pod) = spec.template.spec.as_mut() {
            pod.readiness_gates = None;
            pod.init_containers = None;
            pod.volumes = None;
            pod.termination_grace_period_seconds = None;
            for c in &mut pod.containers {
                c.lifecycle = None;
                c.volume_mounts = None;
                c.startup_probe = None;
            }
        }
    }
    d
}

/// The generated Deployment with `preStop: sleep seconds` instead of the drain gate,
/// and a grace period that lets the sleep finish.
pub fn sleep_instead_of_gate(generated: &K8sDeployment, seconds: u64) -> K8sDeployment {
    let mut d = generated.clone();
    if let Some(pod) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        let grace = pod.termination_grace_period_seconds.unwrap_or(30);
        pod.termination_grace_period_seconds = Some(grace.max(seconds as i64 + 5));
        if let Some(c) = pod.containers.first_mut() {
            c.lifecycle.get_or_insert_default().pre_stop = Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: seconds as i64,
                }),
                ..LifecycleHandler::default()
            });
        }
    }
    d
}

fn plans(
    variant: Variant,
    owned: &OwnedObjects,
) -> Result<(DeploymentPlan, DeploymentPlan), String> {
    let app = &owned.app_deployment;
    let app = match variant {
        Variant::Ballast => app.clone(),
        Variant::KubernetesDefaults => kubernetes_defaults(app),
        Variant::SleepInsteadOfGate(s) => sleep_instead_of_gate(app, s),
    };
    Ok((
        DeploymentPlan::from_deployment(&app)?,
        DeploymentPlan::from_deployment(&owned.proxy_deployment)?,
    ))
}

/// How the stand-in runs pods: local programs for images, the proxies' containers
/// unchanged (they find the API stand-in through `kubeconfig`, as a pod finds the API
/// server), preStop commands with DNS names resolved.
pub(crate) fn runtime(
    cfg: &ScenarioConfig,
    proxies: Arc<Mutex<Option<Deployment>>>,
    kubeconfig: &Path,
) -> PodRuntime {
    let bin = |name: &str| cfg.bin_dir.join(name).to_string_lossy().into_owned();
    let container_args: ArgRewrite = Arc::new(|_: &PodIdentity, argv: Vec<String>| argv);
    let hook_args: ArgRewrite = Arc::new(move |id: &PodIdentity, argv: Vec<String>| {
        let mut out = Vec::new();
        let mut source_added = false;
        for arg in argv {
            if arg == "--" && !source_added {
                out.push(format!("--source-address={}", id.ip));
                source_added = true;
            }
            match arg.strip_prefix("--proxies=") {
                // The headless admin Service publishes every proxy pod, ready or not.
                Some(name) if name.contains(".svc") => {
                    let port = name.rsplit(':').next().unwrap_or("9901").to_owned();
                    let addresses: Vec<String> = lock(&proxies)
                        .as_ref()
                        .map(|d| {
                            d.pods()
                                .iter()
                                .filter(|p| p.status().running)
                                .map(|p| format!("{}:{port}", p.identity.ip))
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(format!("--proxies={}", addresses.join(",")));
                }
                _ => out.push(arg),
            }
        }
        if !source_added {
            out.push(format!("--source-address={}", id.ip));
        }
        out
    });
    PodRuntime {
        programs: BTreeMap::from([
            (
                "ghcr.io/ballast-dev/demo-app:latest".to_owned(),
                bin("ballast-sample-app"),
            ),
            (
                "/usr/local/bin/ballast-proxy".to_owned(),
                bin("ballast-proxy"),
            ),
            (
                format!("{}/ballast-drain", ballast_operator::build::DRAIN_BIN_DIR),
                bin("ballast-drain"),
            ),
        ]),
        log_dir: cfg.work_dir.join("logs"),
        container_args,
        hook_args,
        env: vec![(
            "KUBECONFIG".to_owned(),
            kubeconfig.to_string_lossy().into_owned(),
        )],
    }
}

/// Balance of `after - before` over the pods that were ready and not terminating
/// for the whole window (a pod that got nothing counts as 0).
fn window_balance(before: &LoadStats, after: &LoadStats, steady_pods: &[String]) -> Option<f64> {
    let counts: Vec<u64> = steady_pods
        .iter()
        .map(|p| {
            after.served_by.get(p).copied().unwrap_or(0)
                - before.served_by.get(p).copied().unwrap_or(0)
        })
        .collect();
    if std::env::var_os("BALLAST_DEBUG_BALANCE").is_some() {
        eprintln!("balance window: {steady_pods:?} {counts:?}");
    }
    ballast_operator::rollout::max_over_mean(&counts)
}

fn serving(app: &Deployment) -> Vec<String> {
    let mut names: Vec<String> = app
        .pods()
        .iter()
        .filter(|p| p.ready() && p.status().deleted_at.is_none())
        .map(|p| p.identity.name.clone())
        .collect();
    names.sort();
    names
}

async fn measure_balance(app: &Deployment, load: &Load, steady: Duration) -> Option<f64> {
    // Let the connections and latency estimates settle, then count over the rest.
    let settle = Duration::from_millis(1500).min(steady / 2);
    tokio::time::sleep(settle).await;
    let (start_pods, before) = (serving(app), load.stats());
    tokio::time::sleep(steady.saturating_sub(settle)).await;
    let end_pods = serving(app);
    let steady_pods: Vec<String> = start_pods
        .into_iter()
        .filter(|p| end_pods.contains(p))
        .collect();
    window_balance(&before, &load.stats(), &steady_pods)
}

fn refresh(
    live: &LiveHandle,
    app: &Deployment,
    proxies: Option<&Deployment>,
    load: Option<&Load>,
    status: Option<&Arc<Mutex<StatusView>>>,
) {
    let revision = app.plan().pod.revision;
    let pods: Vec<PodLine> = app
        .pods()
        .iter()
        .map(|p: &Arc<Pod>| PodLine {
            name: p.identity.name.clone(),
            new: p.revision == revision,
            ready: p.ready(),
            terminating: p.status().deleted_at.is_some(),
        })
        .collect();
    let mut l = lock(live);
    l.pods = pods;
    if let Some(load) = load {
        l.load = load.stats();
    }
    if let Some(proxies) = proxies {
        let pods = proxies.pods();
        l.proxies = (pods.iter().filter(|p| p.ready()).count(), pods.len());
    }
    if let Some(status) = status {
        l.draining = lock(status)
            .draining
            .iter()
            .map(|d| (d.pod.clone(), d.in_flight, d.connections))
            .collect();
    }
}

/// Every pod `app` ever had of `revision`.
fn pods_of(app: &Deployment, revision: &str) -> Vec<Arc<Pod>> {
    app.history()
        .into_iter()
        .filter(|p| p.revision == revision)
        .collect()
}

/// Keeps `live` up to date every 200 ms until aborted.
fn spawn_refresher(
    live: &LiveHandle,
    app: &Deployment,
    proxies: Option<&Deployment>,
    load: Option<&Arc<Load>>,
    status: Option<&Arc<Mutex<StatusView>>>,
) -> tokio::task::JoinHandle<()> {
    let (live, app, proxies, load, status) = (
        Arc::clone(live),
        app.clone(),
        proxies.cloned(),
        load.cloned(),
        status.cloned(),
    );
    tokio::spawn(async move {
        loop {
            refresh(
                &live,
                &app,
                proxies.as_ref(),
                load.as_deref(),
                status.as_ref(),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

fn set_phase(live: &LiveHandle, phase: &str) {
    lock(live).phase = phase.to_owned();
}

/// Runs one variant; `live` is kept up to date for a view.
///
/// # Errors
/// When the stand-in cannot run it (a program missing, a pod failing to start, a
/// rollout not finishing within its limit). Failed requests are not errors: they are
/// in the report.
pub async fn run(
    variant: Variant,
    cfg: &ScenarioConfig,
    live: LiveHandle,
) -> Result<ScenarioReport, String> {
    let result = run_inner(variant, cfg, &live).await;
    if let Err(e) = &result {
        lock(&live).error = Some(e.clone());
    }
    result
}

/// A running stand-in cluster before any load: the API, the proxies and the front
/// Service over them (or over the pods), the app rolled out, and the operator's
/// stand-in watching it.
pub(crate) struct Stage {
    pub(crate) api: Arc<ApiServer>,
    pub(crate) app: Deployment,
    pub(crate) proxies: Option<Deployment>,
    pub(crate) front: L4Balancer,
    pub(crate) status: Option<Arc<Mutex<operator::StatusView>>>,
    /// The next release's plans (`demo_service(.., 2, "150m")`).
    pub(crate) app_next: DeploymentPlan,
    pub(crate) proxy_next: DeploymentPlan,
}

/// Starts [`Stage`] for `variant`; `pause_when` replaces the demo's thresholds.
pub(crate) async fn stage(
    variant: Variant,
    cfg: &ScenarioConfig,
    live: &LiveHandle,
    pause_when: Option<PauseThresholds>,
) -> Result<Stage, String> {
    for program in ["ballast-proxy", "ballast-drain", "ballast-sample-app"] {
        if !cfg.bin_dir.join(program).exists() {
            return Err(format!(
                "{} is missing: build it first (cargo build --locked --workspace --bins)",
                cfg.bin_dir.join(program).display()
            ));
        }
    }
    std::fs::create_dir_all(cfg.work_dir.join("logs")).map_err(|e| e.to_string())?;
    let net = cfg.net;
    let first = demo_service(cfg.pods, 1, "100m");
    let owned = operator_objects(&first)?;
    let pause_when = match pause_when {
        Some(p) => p,
        None => {
            serde_norway::from_str::<BalancedService>(&first)
                .map_err(|e| e.to_string())?
                .spec
                .rollout
                .pause_when
        }
    };
    let (app_plan, proxy_plan) = plans(variant, &owned)?;
    let (app_next, proxy_next) = plans(
        variant,
        &operator_objects(&demo_service(cfg.pods, 2, "150m"))?,
    )?;

    // The cluster's API: the proxies list and watch the backends Service's
    // EndpointSlices there, through kube's client, as in a cluster.
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
    set_phase(live, "starting pods");

    // kube-proxy's stand-in (the defaults variant) reads the feed in process.
    let slices = if variant.has_proxies() {
        Some(SliceWriter::new(Arc::clone(&api), &owned.backends_service)?)
    } else {
        None
    };
    let backends_feed = EndpointFeed::start(cfg.propagation, slices);
    let front_ip = Ipv4Addr::new(127, net, 3, 1);
    // The front Service: kube-proxy over the proxies, or (defaults) over the app pods.
    let (proxies, front_feed) = if variant.has_proxies() {
        let proxy_feed = EndpointFeed::start(cfg.propagation, None);
        let proxies = Deployment::start(
            proxy_plan,
            "default",
            runtime.clone(),
            [127, net, 2],
            proxy_feed.clone(),
        );
        *lock(&proxies_slot) = Some(proxies.clone());
        proxies.wait_rolled_out(Duration::from_secs(30)).await?;
        (Some(proxies), proxy_feed)
    } else {
        (None, backends_feed.clone())
    };
    let front = L4Balancer::start((front_ip, 0).into(), front_feed.subscribe(), cfg.seed)
        .await
        .map_err(|e| format!("front Service on {front_ip}: {e}"))?;
    let app = Deployment::start(
        app_plan,
        "default",
        runtime.clone(),
        [127, net, 1],
        backends_feed.clone(),
    );
    let status = proxies
        .as_ref()
        .map(|p| operator::start(app.clone(), p.clone(), ADMIN_PORT, pause_when));
    let refresher = spawn_refresher(live, &app, proxies.as_ref(), None, status.as_ref());
    let wait = app.wait_rolled_out(Duration::from_secs(60)).await;
    refresher.abort();
    wait?;
    // The front must have every proxy (or pod) before load starts (kube-proxy's view).
    let behind_front = proxies.as_ref().unwrap_or(&app).plan().rollout.replicas as usize;
    tokio::time::timeout(
        Duration::from_secs(30),
        front_feed
            .subscribe()
            .wait_for(|set| set.iter().filter(|e| e.ready).count() >= behind_front),
    )
    .await
    .map_err(|_| format!("the front Service did not list {behind_front} ready backends"))?
    .map_err(|e| e.to_string())?;
    Ok(Stage {
        api,
        app,
        proxies,
        front,
        status,
        app_next,
        proxy_next,
    })
}

async fn run_inner(
    variant: Variant,
    cfg: &ScenarioConfig,
    live: &LiveHandle,
) -> Result<ScenarioReport, String> {
    let Stage {
        api,
        app,
        proxies,
        front,
        status,
        app_next,
        proxy_next,
    } = stage(variant, cfg, live, None).await?;

    let load_started = Instant::now();
    let load = Arc::new(Load::start(&LoadPlan {
        target: front.addr,
        rate: cfg.rate,
        clients: cfg.clients,
        // Long requests run during the rollouts (each one holds its pod's drain).
        long_clients: 2,
        long_ms: 1000..=5000,
        long_pause: Duration::from_millis(500),
        ws_clients: 2,
        ws_session: Duration::from_secs(3),
        long_ws: true,
        seed: cfg.seed,
        deadline: Duration::from_secs(400),
    }));
    let refresher = spawn_refresher(live, &app, proxies.as_ref(), Some(&load), status.as_ref());

    set_phase(live, "steady load");
    let balance_before = measure_balance(&app, &load, cfg.steady).await;

    set_phase(live, "rolling out the app");
    let old_revision = app.plan().pod.revision;
    let started = Instant::now();
    app.apply(app_next);
    load.set_long_requests(true);
    let replicas = cfg.pods;
    let mut rollout_available = None;
    loop {
        let old = pods_of(&app, &old_revision);
        let gone = old
            .iter()
            .filter(|p| p.status().exited_at.is_some())
            .count();
        lock(live).replaced = (gone, replicas);
        if rollout_available.is_none() && app.complete() {
            rollout_available = Some(started.elapsed());
        }
        if gone == old.len() && app.rolled_out() {
            break;
        }
        if let Some(e) = app.history().iter().find_map(|p| p.status().error) {
            return Err(e);
        }
        if started.elapsed() > ROLLOUT_LIMIT {
            return Err(format!(
                "the app rollout did not finish within {ROLLOUT_LIMIT:?}: {}",
                app.describe()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rollout = started.elapsed();
    load.set_long_requests(false);
    load.wait_long_requests_done().await;

    set_phase(live, "steady load (new revision)");
    let balance_after = measure_balance(&app, &load, cfg.steady).await;

    let mut proxy_rollout = None;
    if let (Some(proxies), true) = (&proxies, cfg.proxy_rollout) {
        set_phase(live, "rolling out the proxies");
        let old_revision = proxies.plan().pod.revision;
        proxies.apply(proxy_next);
        load.set_long_requests(true);
        let started = Instant::now();
        loop {
            let old_left = proxies
                .history()
                .iter()
                .any(|p| p.revision == old_revision && p.status().exited_at.is_none());
            if !old_left && proxies.rolled_out() {
                break;
            }
            if started.elapsed() > ROLLOUT_LIMIT {
                return Err(format!(
                    "the proxy rollout did not finish within {ROLLOUT_LIMIT:?}: {}",
                    proxies.describe()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy_rollout = Some(started.elapsed());
        load.set_long_requests(false);
        // A moment of load on the new proxies before the end.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    set_phase(live, "stopping");
    refresher.abort();
    let _ = refresher.await;
    let load = Arc::try_unwrap(load).map_err(|_| "the load is still shared".to_owned())?;
    let load_time = load_started.elapsed();
    let stats = load.stop().await;
    // One more whole round of the operator stand-in, so status has the last drains.
    if let Some(status) = &status
        && !operator::next_round(status, 2).await
    {
        return Err("the operator stand-in stopped taking rounds".to_owned());
    }

    let old = pods_of(&app, &old_revision);
    let longest_pre_stop = old
        .iter()
        .filter_map(|p| {
            let s = p.status();
            Some(s.pre_stop_done?.0 - s.deleted_at?)
        })
        .max()
        .unwrap_or_default();
    let (status_summary, events) = match &status {
        Some(s) => {
            let s = lock(s);
            (s.last_rollout.clone(), s.events.clone())
        }
        None => (None, Vec::new()),
    };
    let report = ScenarioReport {
        variant,
        load: stats,
        load_time,
        balance_before,
        balance_after,
        rollout,
        rollout_available: rollout_available.unwrap_or(rollout),
        pods_replaced: old
            .iter()
            .filter(|p| p.status().exited_at.is_some())
            .count(),
        pods_killed: old.iter().filter(|p| p.status().killed).count(),
        longest_pre_stop,
        proxy_rollout,
        status: status_summary,
        events,
        api: api_requests(&api),
    };
    {
        let mut l = lock(live);
        l.load = report.load.clone();
        l.phase = "done".to_owned();
        l.report = Some(report.clone());
    }
    drop(front);
    Ok(report)
}

fn api_requests(api: &ApiServer) -> ApiRequests {
    let requests = api.requests();
    let ok = |verb: Verb| {
        requests
            .iter()
            .filter(|r| r.verb == verb && r.status == 200)
            .count()
    };
    ApiRequests {
        lists: ok(Verb::List),
        watches: ok(Verb::Watch),
        failed: requests.iter().filter(|r| r.status != 200).count(),
    }
}

/// A fresh scratch directory under the system's temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ballast-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Removes a scratch directory (best effort).
pub fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
