//! One pod acted out as kubelet would: the serving container is a local process bound to
//! the pod's loopback address; startup and readiness probes run as specified; on
//! deletion the preStop hook runs, then SIGTERM, then SIGKILL at the grace period.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::plan::{EnvValue, PodPlan, PreStop, ProbePlan};

/// Rewrites a pod's argv before it runs (the container's args, or a preStop command).
pub type ArgRewrite = Arc<dyn Fn(&PodIdentity, Vec<String>) -> Vec<String> + Send + Sync>;

/// Who a pod is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod IP (a loopback address).
    pub ip: Ipv4Addr,
}

/// Where a pod's programs come from and where its output goes.
#[derive(Clone)]
pub struct PodRuntime {
    /// Image or in-pod path -> local program.
    pub programs: BTreeMap<String, String>,
    /// Directory for `<pod>.log` (container and hook output).
    pub log_dir: PathBuf,
    /// Rewrites the container's argv (after `0.0.0.0` and `[::]` became the pod IP).
    pub container_args: ArgRewrite,
    /// Rewrites a preStop command's argv (DNS names, `--source-address`).
    pub hook_args: ArgRewrite,
    /// Environment every container gets from the cluster (in Kubernetes: the API
    /// server's address and a service-account token; here `KUBECONFIG` for the API
    /// stand-in).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for PodRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRuntime")
            .field("programs", &self.programs)
            .field("log_dir", &self.log_dir)
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

/// A pod's state, as the Deployment controller, the EndpointSlice feed and the
/// operator's gate read it.
#[derive(Clone, Debug, Default)]
pub struct PodStatus {
    /// The container process runs.
    pub running: bool,
    /// The startup probe passed (or there is none).
    pub started: bool,
    /// The readiness probe passes.
    pub probe_ready: bool,
    /// Readiness-gate conditions set on the pod (by the operator's stand-in).
    pub gates: BTreeMap<String, bool>,
    /// When the pod last became Ready (probes and gates).
    pub ready_since: Option<Instant>,
    /// When the pod was deleted.
    pub deleted_at: Option<Instant>,
    /// When the preStop hook ended, and its last line of output.
    pub pre_stop_done: Option<(Instant, String)>,
    /// When SIGTERM was sent.
    pub sigterm_at: Option<Instant>,
    /// It did not exit within the grace period and was killed.
    pub killed: bool,
    /// When the process was gone.
    pub exited_at: Option<Instant>,
    /// Why the pod failed to run, if it did.
    pub error: Option<String>,
}

/// A pod of a Deployment.
#[derive(Debug)]
pub struct Pod {
    /// Name, namespace, IP.
    pub identity: PodIdentity,
    /// Hash of the template it was created from.
    pub revision: String,
    /// Container port.
    pub port: u16,
    gates: Vec<String>,
    status: Mutex<PodStatus>,
    delete: Notify,
    /// Retired by the operator (Unix second): out of the backends Service and lowest
    /// `pod-deletion-cost` (see `ballast_operator::adopt`).
    retired: Mutex<Option<i64>>,
}

impl Pod {
    /// A copy of the status.
    pub fn status(&self) -> PodStatus {
        self.lock().clone()
    }

    /// Ready: probes pass and every readiness gate is True.
    pub fn ready(&self) -> bool {
        ready(&self.lock(), &self.gates)
    }

    /// Sets a readiness-gate condition (what the operator's status patch does).
    pub fn set_gate(&self, condition: &str, value: bool) {
        let mut status = self.lock();
        status.gates.insert(condition.to_owned(), value);
        refresh_ready(&mut status, &self.gates);
    }

    /// True when its spec lists the readiness gate `condition`.
    pub fn has_gate(&self, condition: &str) -> bool {
        self.gates.iter().any(|g| g == condition)
    }

    /// What the operator's retire patch does: the pod leaves the backends Service (its
    /// `ballast.dev/backend` label changes) and goes first when its ReplicaSet shrinks
    /// (the lowest `controller.kubernetes.io/pod-deletion-cost`).
    pub fn retire(&self, at: i64) {
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(at);
    }

    /// When it was retired, if it was.
    pub fn retired(&self) -> Option<i64> {
        *self.retired.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes the pod: it is terminating from now on, and kubelet starts stopping it.
    pub fn delete(&self) {
        self.update(|s| {
            s.deleted_at.get_or_insert_with(Instant::now);
        });
        self.delete.notify_one();
    }

    /// Socket address of the container port.
    pub fn address(&self) -> std::net::SocketAddr {
        (self.identity.ip, self.port).into()
    }

    fn lock(&self) -> MutexGuard<'_, PodStatus> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut PodStatus)) {
        let mut status = self.lock();
        change(&mut status);
        refresh_ready(&mut status, &self.gates);
    }
}

fn ready(status: &PodStatus, gates: &[String]) -> bool {
    status.running
        && status.started
        && status.probe_ready
        && gates
            .iter()
            .all(|g| status.gates.get(g).copied().unwrap_or(false))
}

fn refresh_ready(status: &mut PodStatus, gates: &[String]) {
    match (ready(status, gates), status.ready_since) {
        (true, None) => status.ready_since = Some(Instant::now()),
        (false, Some(_)) => status.ready_since = None,
        _ => {}
    }
}

/// Creates the pod and starts acting it out in a task; the task ends once the process
/// is gone after a deletion (or by itself).
pub fn start(identity: PodIdentity, plan: &PodPlan, runtime: &PodRuntime) -> Arc<Pod> {
    let pod = Arc::new(Pod {
        identity,
        revision: plan.revision.clone(),
        port: plan.port,
        gates: plan.readiness_gates.clone(),
        status: Mutex::new(PodStatus::default()),
        delete: Notify::new(),
        retired: Mutex::new(None),
    });
    tokio::spawn(kubelet(Arc::clone(&pod), plan.clone(), runtime.clone()));
    pod
}

fn program(runtime: &PodRuntime, name: &str) -> String {
    runtime
        .programs
        .get(name)
        .cloned()
        .unwrap_or_else(|| name.to_owned())
}

fn log_file(runtime: &PodRuntime, pod: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(runtime.log_dir.join(format!("{pod}.log")))
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

fn spawn_container(pod: &Pod, plan: &PodPlan, runtime: &PodRuntime) -> Result<Child, String> {
    let id = &pod.identity;
    let mut argv: Vec<String> = if plan.command.is_empty() {
        vec![plan.image.clone()]
    } else {
        plan.command.clone()
    };
    argv.extend(plan.args.iter().cloned());
    // Every pod shares the host's network here: "all interfaces" (IPv4 or dual-stack)
    // means the pod's IP.
    let argv: Vec<String> = argv
        .into_iter()
        .map(|a| {
            a.replace("0.0.0.0", &id.ip.to_string())
                .replace("[::]", &id.ip.to_string())
        })
        .collect();
    let mut argv = (runtime.container_args)(id, argv);
    let program = program(runtime, &argv.remove(0));
    let mut command = Command::new(&program);
    command
        .args(&argv)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file(runtime, &id.name))
        .stderr(log_file(runtime, &id.name))
        .envs(runtime.env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    for (name, value) in &plan.env {
        let value = match value {
            EnvValue::Literal(v) => v.clone(),
            EnvValue::Field(path) => match path.as_str() {
                "metadata.name" => id.name.clone(),
                "metadata.namespace" => id.namespace.clone(),
                "status.podIP" => id.ip.to_string(),
                _ => String::new(),
            },
        };
        command.env(name, value);
    }
    command
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))
}

/// SIGTERM to the container's process, if it still runs.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = crate::sigterm(pid);
    }
}

async fn kubelet(pod: Arc<Pod>, plan: PodPlan, runtime: PodRuntime) {
    let mut child = match spawn_container(&pod, &plan, &runtime) {
        Ok(child) => child,
        Err(e) => {
            pod.update(|s| {
                s.error = Some(e);
                s.exited_at = Some(Instant::now());
            });
            return;
        }
    };
    pod.update(|s| s.running = true);
    let prober = tokio::spawn(probe(Arc::clone(&pod), plan.clone()));

    tokio::select! {
        () = pod.delete.notified() => {}
        exit = child.wait() => {
            prober.abort();
            pod.update(|s| {
                s.running = false;
                s.error = Some(format!("the container exited by itself: {exit:?}"));
                s.exited_at = Some(Instant::now());
            });
            return;
        }
    }

    let deleted = pod.status().deleted_at.unwrap_or_else(Instant::now);
    let deadline = deleted + plan.grace;
    let hook_line = tokio::time::timeout_at(deadline, pre_stop(&pod, &plan, &runtime))
        .await
        .unwrap_or_else(|_| "preStop hook killed at the grace period".to_owned());
    pod.update(|s| {
        s.pre_stop_done = Some((Instant::now(), hook_line));
        s.sigterm_at = Some(Instant::now());
    });
    terminate(&child);
    // kubelet gives 2 s more when the hook used up the grace period.
    let stop_by = deadline.max(Instant::now() + Duration::from_secs(2));
    let killed = tokio::time::timeout_at(stop_by, child.wait())
        .await
        .is_err();
    if killed {
        let _ = child.kill().await;
    }
    prober.abort();
    pod.update(|s| {
        s.running = false;
        s.killed = killed;
        s.exited_at = Some(Instant::now());
    });
}

/// Runs the preStop hook; returns its last line of output.
async fn pre_stop(pod: &Pod, plan: &PodPlan, runtime: &PodRuntime) -> String {
    match &plan.pre_stop {
        PreStop::None => String::new(),
        PreStop::Sleep(d) => {
            tokio::time::sleep(*d).await;
            format!("slept {}s", d.as_secs())
        }
        PreStop::Exec(argv) => {
            let mut argv = (runtime.hook_args)(&pod.identity, argv.clone());
            if argv.is_empty() {
                return "empty preStop command".to_owned();
            }
            let program = program(runtime, &argv.remove(0));
            let output = Command::new(&program)
                .args(&argv)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .output()
                .await;
            match output {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stderr).into_owned()
                        + &String::from_utf8_lossy(&out.stdout);
                    let _ = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(runtime.log_dir.join(format!("{}.log", pod.identity.name)))
                        .and_then(|mut f| {
                            std::io::Write::write_all(&mut f, format!("preStop: {text}").as_bytes())
                        });
                    text.lines().last().unwrap_or_default().trim().to_owned()
                }
                Err(e) => format!("preStop {program} failed to start: {e}"),
            }
        }
    }
}

async fn probe(pod: Arc<Pod>, plan: PodPlan) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    // kubelet opens a connection per probe and keeps none.
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let ip = pod.identity.ip;
    if let Some(startup) = &plan.startup {
        run_probe(&client, ip, startup, |passed| {
            if passed {
                pod.update(|s| s.started = true);
            }
            !passed
        })
        .await;
    }
    pod.update(|s| s.started = true);
    match &plan.readiness {
        None => pod.update(|s| s.probe_ready = true),
        Some(readiness) => {
            run_probe(&client, ip, readiness, |passed| {
                pod.update(|s| s.probe_ready = passed);
                true
            })
            .await;
        }
    }
}

/// Probes every period; `on_result(passed)` is called whenever the thresholds flip the
/// result, and probing stops when it returns false.
async fn run_probe(
    client: &Client<HttpConnector, Empty<Bytes>>,
    ip: Ipv4Addr,
    probe: &ProbePlan,
    mut on_result: impl FnMut(bool) -> bool,
) {
    let uri: hyper::Uri = match format!("http://{ip}:{}{}", probe.port, probe.path).parse() {
        Ok(uri) => uri,
        Err(_) => return,
    };
    tokio::time::sleep(probe.initial_delay).await;
    let (mut successes, mut failures, mut passed) = (0, 0, None);
    let mut tick = tokio::time::interval(probe.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = tokio::time::timeout(probe.timeout, client.get(uri.clone()))
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status().is_success() || r.status().is_redirection()));
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let now = if successes >= probe.success_threshold {
            Some(true)
        } else if failures >= probe.failure_threshold {
            Some(false)
        } else {
            passed
        };
        if now != passed {
            passed = now;
            if let Some(p) = now
                && !on_result(p)
            {
                return;
            }
        }
    }
}
