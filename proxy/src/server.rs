//! Listeners, the discovery feed and the proxy's own graceful shutdown.

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::balance::zone::{Locality, Peer};
use crate::config::Config;
use crate::config::ZoneConfig;
use crate::discovery::{self, PortFeed};
use crate::endpoint::EndpointSet;
use crate::forward::{Proxy, ProxyConfig};
use crate::load::RetryBudget;
use crate::metrics::Metrics;
use crate::registry::{Port, Ports, Registry, ZoneRouting, ZoneState};
use crate::workers::Workers;
use ballast_api::settings::ZoneRouting as ZoneMode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The access log could not be opened.
    #[error("cannot open the access log {destination}")]
    AccessLog {
        /// Where it should go.
        destination: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The serving threads could not be started.
    #[error("cannot start {count} worker threads")]
    Workers {
        /// How many were asked for.
        count: usize,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No client listener was configured.
    #[error("no client listener configured")]
    NoListener,
    /// A listener could not bind.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A started proxy.
#[derive(Debug)]
pub struct Running {
    /// Where clients connect to the first listener (the real port when 0 was asked).
    pub listen: SocketAddr,
    /// Every client listener, in the configuration's order.
    pub listeners: Vec<SocketAddr>,
    /// Where the admin listener is.
    pub admin: SocketAddr,
    /// Every listener's endpoints (for tests and introspection).
    pub ports: Ports,
    /// The first listener's endpoints: all of them with one listener.
    pub registry: Arc<Registry>,
    shutdown: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts the graceful shutdown and waits until it is complete.
    pub async fn shutdown(self) {
        self.shutdown.notify_one();
        let _ = self.task.await;
    }

    /// A handle that starts the shutdown when notified.
    pub fn shutdown_trigger(&self) -> Arc<Notify> {
        self.shutdown.clone()
    }

    /// Waits until the proxy has stopped.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Binds `address`. `[::]` takes IPv6 and IPv4 alike (Linux's default for a wildcard
/// IPv6 socket), so one default serves single- and dual-stack pods; on a node with IPv6
/// turned off it falls back to `0.0.0.0` on the same port.
pub async fn bind_dual_stack(address: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(address).await {
        Err(e) if address.ip() == std::net::Ipv6Addr::UNSPECIFIED && no_ipv6(&e) => {
            tracing::warn!(%address, error = %e, "IPv6 unavailable; listening on IPv4 only");
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], address.port()))).await
        }
        other => other,
    }
}

/// EAFNOSUPPORT (IPv6 disabled in the kernel) or EADDRNOTAVAIL.
fn no_ipv6(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(97)
}

/// Binds the listeners and starts serving.
///
/// # Errors
/// When a listener cannot bind.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let bind = |address: SocketAddr| async move {
        let listener = bind_dual_stack(address)
            .await
            .map_err(|source| StartError::Bind { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StartError::Bind { address, source })?;
        Ok::<_, StartError>((listener, bound))
    };
    let Some(first) = config.listeners.first().cloned() else {
        return Err(StartError::NoListener);
    };
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        listeners.push(bind(listener.listen).await?);
    }
    let (admin_listener, admin_addr) = bind(config.admin_listen).await?;
    let listen: Vec<SocketAddr> = listeners.iter().map(|(_, bound)| *bound).collect();

    // Threads before any task: a failure here leaves nothing running behind.
    let workers_count = config.workers;
    let workers = Workers::start(workers_count).map_err(|source| StartError::Workers {
        count: workers_count,
        source,
    })?;

    // One registry per listener: each port's endpoints are balanced, ejected and pooled
    // apart, and the admin API sums a pod's ports. Zone routing's locality is shared.
    let zones =
        (config.zones.routing == ZoneMode::PreferSameZone).then(|| Arc::new(ZoneState::default()));
    let ports = Ports::new(
        config
            .listeners
            .iter()
            .map(|listener| {
                let registry = Registry::new(config.balancer.clone());
                let registry = match &zones {
                    Some(zones) => registry.with_zone_routing(ZoneRouting::new(
                        zones.clone(),
                        listener.port_name.clone(),
                    )),
                    None => registry,
                };
                Port {
                    name: listener.port_name.clone(),
                    registry: Arc::new(registry),
                }
            })
            .collect(),
    );
    let Some(registry) = ports.iter().next().map(|p| p.registry.clone()) else {
        return Err(StartError::NoListener);
    };
    let metrics = Arc::new(Metrics::new(ports.clone(), zones.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let proxy = Proxy::new(
        registry.clone(),
        metrics.clone(),
        ProxyConfig {
            connect: first.connect,
            response_timeout: config.response_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            retry_body_limit: config.retry_body_limit,
            max_in_flight: config.max_in_flight,
            max_attempts: config.retry_attempts,
            affinity: config.affinity.clone(),
        },
        RetryBudget::new(
            config.retry_budget_ratio,
            config.retry_min_per_second,
            Instant::now(),
        ),
    );
    let (proxy, log_writer) = match &config.access_log {
        Some(destination) => {
            let (log, writer) = AccessLog::start(
                destination.clone(),
                config.access_log_query,
                metrics.access_log_dropped.clone(),
            )
            .await
            .map_err(|source| StartError::AccessLog {
                destination: format!("{destination:?}"),
                source,
            })?;
            (proxy.with_access_log(log), Some(writer))
        }
        None => (proxy, None),
    };
    let admin = Admin {
        ports: ports.clone(),
        metrics,
        ready: ready.clone(),
    };

    // One discovery (one EndpointSlice watch) feeds every listener's registry; the
    // proxy is ready once each has its first set.
    let unfed = Arc::new(AtomicUsize::new(config.listeners.len()));
    let mut feeds = Vec::with_capacity(config.listeners.len());
    let mut served = Vec::with_capacity(config.listeners.len());
    for ((listener, port), (socket, _)) in config.listeners.iter().zip(ports.iter()).zip(listeners)
    {
        let (tx, rx) = watch::channel(EndpointSet::default());
        feeds.push(PortFeed {
            port_name: port.name.clone(),
            tx,
        });
        tokio::spawn(feed(
            rx,
            port.registry.clone(),
            unfed.clone(),
            ready.clone(),
        ));
        tokio::spawn(housekeeping(
            port.registry.clone(),
            listener.connect.idle_timeout,
        ));
        served.push((
            socket,
            proxy.for_port(port.registry.clone(), listener.connect),
        ));
    }
    if let Some(zones) = zones {
        let namespace = match &config.source {
            discovery::Source::Kubernetes { namespace, .. } => namespace.clone(),
            _ => None,
        };
        tokio::spawn(learn_zone(config.zones.clone(), namespace, zones));
    }
    let source = config.source.clone();
    tokio::spawn(async move {
        if let Err(e) = discovery::run(source, feeds).await {
            tracing::error!(error = %e, "discovery stopped; keeping the last endpoints");
        }
    });

    let shutdown = Arc::new(Notify::new());
    let task = tokio::spawn(serve(
        config,
        (served, admin_listener),
        workers,
        proxy,
        admin,
        shutdown.clone(),
        log_writer,
    ));
    for (address, port) in listen.iter().zip(ports.iter()) {
        tracing::info!(%address, port = port.name.as_deref().unwrap_or("-"), "client listener bound");
    }
    let first_listen = listen.first().copied().unwrap_or(first.listen);
    tracing::info!(listen = %first_listen, listeners = listen.len(), admin = %admin_addr, workers = workers_count, "ballast-proxy listening");
    Ok(Running {
        listen: first_listen,
        listeners: listen,
        admin: admin_addr,
        ports,
        registry,
        shutdown,
        task,
    })
}

/// Applies every discovery update to one listener's registry; the proxy is ready when
/// every listener has had its first.
async fn feed(
    mut rx: watch::Receiver<EndpointSet>,
    registry: Arc<Registry>,
    unfed: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
) {
    let mut first = true;
    while rx.changed().await.is_ok() {
        let set = rx.borrow_and_update().clone();
        registry.apply(&set, Instant::now());
        tracing::debug!(endpoints = set.len(), "endpoints updated");
        if first {
            first = false;
            if unfed.fetch_sub(1, Relaxed) == 1 {
                ready.store(true, Relaxed);
            }
        }
    }
}

/// Finds this proxy's zone and the proxies' spread for zone routing: from `--zone`
/// alone once, or from the proxies' Service for as long as the proxy runs. Routing is
/// as if off until the zone is known; it is logged when it becomes known or changes.
async fn learn_zone(zones: ZoneConfig, namespace: Option<String>, state: Arc<ZoneState>) {
    let Some(service) = zones.proxy_service.clone() else {
        if let Some(zone) = zones.zone {
            tracing::info!(
                zone,
                "zone routing on in zone {zone} (--zone); the proxies' spread is unknown, assumed even over the zones with endpoints"
            );
            state.locality.store(Some(Arc::new(Locality {
                zone: zone.into(),
                proxies: None,
            })));
        }
        return;
    };
    let (tx, mut rx) = watch::channel(EndpointSet::default());
    let watched = service.clone();
    tokio::spawn(async move {
        if let Err(e) = discovery::run_proxies(&watched, namespace.as_deref(), tx).await {
            tracing::error!(service = watched, error = %e, "cannot watch the proxies' Service; zone routing stays off");
        }
    });
    // A pod's zone does not change: once known it stays, even when the pod is no longer
    // listed (terminating, a slice being rewritten).
    let mut zone = zones.zone.clone();
    let mut current: Option<Arc<Locality>> = None;
    let mut waiting_logged = false;
    while rx.changed().await.is_ok() {
        let peers = rx.borrow_and_update().clone();
        let Some(locality) = Locality::from_peers(
            peers.iter().map(|e| Peer {
                pod: e.name.as_deref(),
                zone: e.zone.as_deref(),
            }),
            zones.pod_name.as_deref(),
            zone.as_deref(),
        ) else {
            if !waiting_logged {
                waiting_logged = true;
                tracing::warn!(
                    service,
                    pod = zones.pod_name.as_deref().unwrap_or("-"),
                    proxies = peers.len(),
                    "this proxy's pod is not listed with a zone in the proxies' Service yet; zone routing waits for it"
                );
            }
            continue;
        };
        if current.as_deref() == Some(&locality) {
            continue;
        }
        let spread = locality
            .proxies
            .iter()
            .flatten()
            .map(|(z, n)| format!("{z}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        if current.as_ref().map(|c| &c.zone) != Some(&locality.zone) {
            tracing::info!(zone = %locality.zone, proxies = spread, "zone routing on in zone {}", locality.zone);
        } else {
            tracing::debug!(zone = %locality.zone, proxies = spread, "proxies' spread over the zones changed");
        }
        zone = Some(locality.zone.to_string());
        let locality = Arc::new(locality);
        state.locality.store(Some(locality.clone()));
        current = Some(locality);
    }
}

async fn housekeeping(registry: Arc<Registry>, idle_timeout: Duration) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticker.tick().await;
        let now = Instant::now();
        registry.tick(now);
        for endpoint in &registry.snapshot().endpoints {
            endpoint.pool.expire(now, idle_timeout);
        }
    }
}

async fn serve(
    config: Config,
    (listeners, admin_listener): (Vec<(TcpListener, Proxy)>, TcpListener),
    mut workers: Workers,
    proxy: Proxy,
    admin: Admin,
    shutdown: Arc<Notify>,
    log_writer: Option<JoinHandle<()>>,
) {
    let ready = admin.ready.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32);
    let builder = Arc::new(builder);

    let ports = admin.ports.clone();
    let admin_task = tokio::spawn(serve_admin(admin_listener, admin));
    let graceful = GracefulShutdown::new();
    let accept = async {
        // Polled from a different listener first each time, so a busy one cannot
        // starve the others.
        let mut start = 0;
        loop {
            let (index, accepted) = std::future::poll_fn(|cx| {
                for offset in 0..listeners.len() {
                    let index = (start + offset) % listeners.len();
                    if let Poll::Ready(accepted) = listeners[index].0.poll_accept(cx) {
                        return Poll::Ready((index, accepted));
                    }
                }
                Poll::Pending
            })
            .await;
            start = (index + 1) % listeners.len();
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // The connection moves to a worker's runtime (and its reactor) for good.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "accepted connection unusable");
                    continue;
                }
            };
            let service = listeners[index].1.for_client(peer);
            let watcher = graceful.watcher();
            let builder = builder.clone();
            let served = workers.spawn(async move {
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "accepted connection unusable");
                        return;
                    }
                };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
            });
            if !served {
                tracing::error!(%peer, "no worker thread left to serve connections; refusing");
            }
        }
    };
    let draining = async {
        shutdown.notified().await;
        ready.store(false, Relaxed);
        proxy.start_closing();
        tracing::info!(delay = ?config.shutdown_delay, "shutting down: /ready fails, still serving while load balancers catch up");
        tokio::time::sleep(config.shutdown_delay).await;
    };
    tokio::select! {
        () = accept => {}
        () = draining => {}
    }
    // The listeners' proxies are clones of `proxy`: same shutdown state and tunnels.
    drop(listeners);
    tracing::info!(
        "closing client connections (HTTP/1.1 Connection: close, HTTP/2 GOAWAY) and finishing in-flight requests"
    );
    let deadline = Instant::now() + config.drain_timeout;
    match tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all client connections closed"),
        Err(_) => {
            // Long-lived streams (gRPC, downloads) still open are cut now: counted as
            // forced, like a pod's drain that timed out.
            let in_flight = ports.in_flight(Instant::now());
            tracing::warn!(
                timeout = ?config.drain_timeout,
                forced = in_flight,
                "drain timeout reached; closing remaining connections and the requests and streams still in flight on them"
            )
        }
    }
    // Upgraded connections (WebSocket) left hyper's hands at the upgrade: they get the
    // rest of the drain time, then are cut and counted.
    let forced = proxy.close_tunnels(deadline).await;
    if forced > 0 {
        tracing::warn!(
            forced,
            "upgraded connections still open at the drain timeout were closed"
        );
    }
    admin_task.abort();
    // Stops the worker threads; what still runs there (idle upstream connections) ends.
    drop(workers);
    // Last access-log records: the writer flushes and ends once the proxy (and every
    // connection's copy of it) is gone.
    drop(proxy);
    if let Some(writer) = log_writer
        && tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .is_err()
    {
        tracing::warn!("access log not flushed within 2s of shutdown");
    }
}

async fn serve_admin(listener: TcpListener, admin: Admin) {
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let conn = builder.serve_connection(TokioIo::new(stream), admin.for_peer(peer));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
