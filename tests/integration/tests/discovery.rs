//! The proxy's EndpointSlice discovery as it runs in a cluster: kube's real client and
//! watcher, over HTTP, against the list/watch stand-in (`ballast_integration::apiserver`)
//! speaking the API server's wire format. Then the `ballast-proxy` binary itself with
//! `--kube-service`, pointed at the stand-in by a kubeconfig.

#![allow(clippy::unwrap_used)]

use ballast_integration::apiserver::{ApiServer, Fault, RequestRecord, Verb};
use ballast_integration::{Process, free_port, workspace_bin};
use ballast_proxy::discovery::{PortFeed, watch_endpoint_slices};
use ballast_proxy::endpoint::EndpointSet;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const NS: &str = "shop";
const LIMIT: Duration = Duration::from_secs(20);
/// kube's default watcher backoff starts at 800 ms (plus jitter).
const MIN_BACKOFF: Duration = Duration::from_millis(700);

/// One endpoint of a slice: pod IP, pod name, ready.
type Ep<'a> = (&'a str, &'a str, bool);

/// An EndpointSlice of `service` as the EndpointSlice controller writes it.
fn slice(name: &str, service: &str, endpoints: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": pod},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"},
                  {"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

async fn stand_in() -> ApiServer {
    let server = ApiServer::start([127, 0, 0, 1].into()).await.unwrap();
    server.serve::<EndpointSlice>();
    server
}

/// Discovery of Service `web` (port `http`) running against `server`, with every set it
/// published recorded.
struct Discovery {
    rx: watch::Receiver<EndpointSet>,
    published: Arc<Mutex<Vec<EndpointSet>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Discovery {
    fn start(server: &ApiServer) -> Self {
        // The namespace comes from the client's configuration, as in a pod.
        let client = server.client(NS).unwrap();
        let (tx, rx) = watch::channel(EndpointSet::default());
        let published = Arc::new(Mutex::new(Vec::new()));
        let mut seen = rx.clone();
        let record = Arc::clone(&published);
        let recorder = tokio::spawn(async move {
            while seen.changed().await.is_ok() {
                let set = seen.borrow_and_update().clone();
                record.lock().unwrap().push(set);
            }
        });
        let discovery = tokio::spawn(async move {
            let http = PortFeed {
                port_name: Some("http".to_owned()),
                tx,
            };
            watch_endpoint_slices(client, "web", None, vec![http]).await;
        });
        Self {
            rx,
            published,
            tasks: vec![recorder, discovery],
        }
    }

    /// `ip:port (ready)` of every endpoint in the current set.
    fn now(&self) -> Vec<String> {
        describe(&self.rx.borrow())
    }

    fn published(&self) -> Vec<Vec<String>> {
        self.published
            .lock()
            .unwrap()
            .iter()
            .map(describe)
            .collect()
    }

    async fn wait_for(&self, expected: &[&str]) {
        let started = Instant::now();
        while self.now() != expected {
            assert!(
                started.elapsed() < LIMIT,
                "expected {expected:?}, have {:?} (published: {:?})",
                self.now(),
                self.published()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn describe(set: &EndpointSet) -> Vec<String> {
    set.iter()
        .map(|e| {
            format!(
                "{} {}{}",
                e.address,
                e.name.as_deref().unwrap_or("-"),
                if e.ready { "" } else { " unready" }
            )
        })
        .collect()
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < LIMIT, "not within {LIMIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn of(server: &ApiServer, verb: Verb) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.verb == verb)
        .collect()
}

fn gaps(records: &[RequestRecord]) -> Vec<Duration> {
    records.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_is_published_as_one_whole_set_then_watched() {
    let server = stand_in().await;
    server
        .apply_value(slice("web-a", "web", &[("10.0.0.1", "web-1", true)]))
        .unwrap();
    server
        .apply_value(slice(
            "web-b",
            "web",
            &[("10.0.0.2", "web-2", true), ("10.0.0.3", "web-3", false)],
        ))
        .unwrap();
    server
        .apply_value(slice("db-a", "db", &[("10.0.9.1", "db-1", true)]))
        .unwrap();
    let discovery = Discovery::start(&server);
    let all = [
        "10.0.0.1:8080 web-1",
        "10.0.0.2:8080 web-2",
        "10.0.0.3:8080 web-3 unready",
    ];
    discovery.wait_for(&all).await;
    assert_eq!(
        discovery.published()[0],
        all,
        "the first set is the whole list"
    );

    // The list's end was seen: the watcher moved on to WATCH from the list's version.
    eventually("a WATCH request", || server.count(Verb::Watch) >= 1).await;
    let list = &of(&server, Verb::List)[0];
    assert_eq!(
        list.query["labelSelector"],
        "kubernetes.io/service-name=web"
    );
    assert_eq!(
        list.path,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
    );
    let watch = &of(&server, Verb::Watch)[0];
    assert_eq!(
        watch.query["resourceVersion"],
        server.resource_version().to_string(),
        "the list's version"
    );
    assert_eq!(watch.query["allowWatchBookmarks"], "true");
    assert_eq!(server.count(Verb::List), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_add_modify_delete_and_bookmark_are_applied() {
    let server = stand_in().await;
    server
        .apply_value(slice("web-a", "web", &[("10.0.0.1", "web-1", true)]))
        .unwrap();
    let discovery = Discovery::start(&server);
    discovery.wait_for(&["10.0.0.1:8080 web-1"]).await;
    eventually("a WATCH request", || server.count(Verb::Watch) >= 1).await;

    // ADDED
    server
        .apply_value(slice("web-b", "web", &[("10.0.0.2", "web-2", true)]))
        .unwrap();
    discovery
        .wait_for(&["10.0.0.1:8080 web-1", "10.0.0.2:8080 web-2"])
        .await;
    // MODIFIED
    server
        .apply_value(slice("web-a", "web", &[("10.0.0.1", "web-1", false)]))
        .unwrap();
    discovery
        .wait_for(&["10.0.0.1:8080 web-1 unready", "10.0.0.2:8080 web-2"])
        .await;
    // DELETED: the slice stops being routed at once.
    server.delete::<EndpointSlice>(NS, "web-b").unwrap();
    discovery.wait_for(&["10.0.0.1:8080 web-1 unready"]).await;

    // BOOKMARK: another Service's change moves the version on without an event for
    // this watch; the bookmark carries it, and a resumed watch starts from there.
    let moved_on = server
        .apply_value(slice("db-a", "db", &[("10.0.9.1", "db-1", true)]))
        .unwrap();
    server.bookmark();
    // The bookmark reaches the watcher asynchronously; resuming before it would
    // restart from the older version, so retry the cut until the resume shows it.
    let started = Instant::now();
    loop {
        let watches = server.count(Verb::Watch);
        server.close_watches();
        eventually("a resumed WATCH", || server.count(Verb::Watch) > watches).await;
        if of(&server, Verb::Watch).last().unwrap().query["resourceVersion"] == moved_on.to_string()
        {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the bookmark's version was never used"
        );
        server.bookmark();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.count(Verb::List), 1, "a resumed watch needs no list");
    assert_eq!(discovery.now(), ["10.0.0.1:8080 web-1 unready"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_version_after_a_gap_relists_and_replaces_the_set() {
    let server = stand_in().await;
    for (name, ip, pod) in [
        ("web-a", "10.0.0.1", "web-1"),
        ("web-b", "10.0.0.2", "web-2"),
        ("web-c", "10.0.0.3", "web-3"),
    ] {
        server
            .apply_value(slice(name, "web", &[(ip, pod, true)]))
            .unwrap();
    }
    let discovery = Discovery::start(&server);
    let before = [
        "10.0.0.1:8080 web-1",
        "10.0.0.2:8080 web-2",
        "10.0.0.3:8080 web-3",
    ];
    discovery.wait_for(&before).await;
    eventually("a WATCH request", || server.count(Verb::Watch) >= 1).await;

    // The watcher is cut off; meanwhile web-b is deleted, web-d created, and the
    // history compacted: the resumed watch gets 410 Gone and must list again.
    server.partition();
    server.delete::<EndpointSlice>(NS, "web-b").unwrap();
    server
        .apply_value(slice("web-d", "web", &[("10.0.0.4", "web-4", true)]))
        .unwrap();
    server.compact();
    server.heal();
    let after = [
        "10.0.0.1:8080 web-1",
        "10.0.0.3:8080 web-3",
        "10.0.0.4:8080 web-4",
    ];
    discovery.wait_for(&after).await;
    assert_eq!(server.count(Verb::List), 2, "one re-list");
    // Nothing partial: every set published was the old whole set or the new one.
    for set in discovery.published() {
        assert!(
            set == before || set == after,
            "partial set published: {set:?}"
        );
    }

    // A 410 on an open watch (the watch cache dropped it) re-lists too. The watch the
    // watcher opened after its re-list must be open first, or there is nothing to expire.
    eventually("a watch after the re-list", || {
        let requests = server.requests();
        let last_list = requests.iter().rposition(|r| r.verb == Verb::List);
        let last_watch = requests.iter().rposition(|r| r.verb == Verb::Watch);
        last_watch > last_list
    })
    .await;
    server.expire_watches();
    eventually("a second re-list", || server.count(Verb::List) == 3).await;
    server
        .apply_value(slice("web-e", "web", &[("10.0.0.5", "web-5", true)]))
        .unwrap();
    discovery
        .wait_for(&[
            "10.0.0.1:8080 web-1",
            "10.0.0.3:8080 web-3",
            "10.0.0.4:8080 web-4",
            "10.0.0.5:8080 web-5",
        ])
        .await;
    assert!(
        discovery.published().iter().all(|s| !s.is_empty()),
        "the set never went empty: {:?}",
        discovery.published()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_watch_errors_are_retried_with_backoff_keeping_the_last_set() {
    let server = stand_in().await;
    server
        .apply_value(slice("web-a", "web", &[("10.0.0.1", "web-1", true)]))
        .unwrap();
    server.fail_next(Verb::List, Fault::Status(500), 2);
    let discovery = Discovery::start(&server);
    discovery.wait_for(&["10.0.0.1:8080 web-1"]).await;
    let lists = of(&server, Verb::List);
    assert_eq!(
        lists.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    for gap in gaps(&lists) {
        assert!(gap >= MIN_BACKOFF, "list retried after {gap:?}");
    }
    eventually("a WATCH request", || server.count(Verb::Watch) >= 1).await;

    // The watch breaks and cannot be re-established twice (an HTTP error, then a
    // dropped connection). A change made meanwhile arrives once it can. (500, not 503:
    // kube's client retries 429/503/504 itself before the watcher sees an error.)
    let watches = server.count(Verb::Watch);
    server.fail_next(Verb::Watch, Fault::Status(500), 1);
    server.fail_next(Verb::Watch, Fault::Drop, 1);
    server.close_watches();
    server
        .apply_value(slice("web-a", "web", &[("10.0.0.2", "web-2", true)]))
        .unwrap();
    eventually("two failed watch attempts", || {
        server.count(Verb::Watch) >= watches + 2
    })
    .await;
    assert_eq!(
        discovery.now(),
        ["10.0.0.1:8080 web-1"],
        "the last good set stays while the watch fails"
    );
    discovery.wait_for(&["10.0.0.2:8080 web-2"]).await;
    let resumed = &of(&server, Verb::Watch)[watches..];
    assert_eq!(
        resumed.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 0, 200]
    );
    for gap in gaps(resumed) {
        assert!(gap >= MIN_BACKOFF, "watch retried after {gap:?}");
    }
    assert_eq!(server.count(Verb::List), 3, "resumed, not re-listed");
    assert!(discovery.published().iter().all(|s| !s.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_moving_between_slices_is_never_doubled_nor_missing() {
    let server = stand_in().await;
    server
        .apply_value(slice(
            "web-a",
            "web",
            &[("10.0.0.1", "web-1", true), ("10.0.0.2", "web-2", true)],
        ))
        .unwrap();
    server
        .apply_value(slice("web-b", "web", &[("10.0.0.3", "web-3", true)]))
        .unwrap();
    let discovery = Discovery::start(&server);
    let all = [
        "10.0.0.1:8080 web-1",
        "10.0.0.2:8080 web-2",
        "10.0.0.3:8080 web-3",
    ];
    discovery.wait_for(&all).await;
    eventually("a WATCH request", || server.count(Verb::Watch) >= 1).await;

    // The EndpointSlice controller rebalancing: web-2 is added to web-b, then removed
    // from web-a, each a separate watch event; web-c, created last, shows when both
    // have been seen (a watch delivers in order).
    server
        .apply_value(slice(
            "web-b",
            "web",
            &[("10.0.0.3", "web-3", true), ("10.0.0.2", "web-2", true)],
        ))
        .unwrap();
    server
        .apply_value(slice("web-a", "web", &[("10.0.0.1", "web-1", true)]))
        .unwrap();
    server
        .apply_value(slice("web-c", "web", &[("10.0.0.4", "web-4", true)]))
        .unwrap();
    let mut expected = all.to_vec();
    expected.push("10.0.0.4:8080 web-4");
    discovery.wait_for(&expected).await;

    // And back, during a gap that ends in a re-list; web-d marks its end.
    server.partition();
    server
        .apply_value(slice(
            "web-a",
            "web",
            &[("10.0.0.1", "web-1", true), ("10.0.0.2", "web-2", true)],
        ))
        .unwrap();
    server
        .apply_value(slice("web-b", "web", &[("10.0.0.3", "web-3", true)]))
        .unwrap();
    server
        .apply_value(slice("web-d", "web", &[("10.0.0.5", "web-5", true)]))
        .unwrap();
    server.compact();
    server.heal();
    expected.push("10.0.0.5:8080 web-5");
    discovery.wait_for(&expected).await;
    assert_eq!(server.count(Verb::List), 2, "the gap ended in a re-list");
    for set in discovery.published() {
        let web2 = set
            .iter()
            .filter(|e| e.starts_with("10.0.0.2:8080 web-2"))
            .count();
        assert_eq!(web2, 1, "web-2 doubled or missing in {set:?}");
    }
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out))
}

/// The proxy with `--kube-service`, `--namespace` and the one-listener `--port-name`,
/// and a Kubernetes client configured from the environment (KUBECONFIG here). The
/// operator's own `--port` listeners run in `tests/multiport.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_kube_service_becomes_ready_and_routes_to_the_slices() {
    let server = stand_in().await;
    let app = Process::spawn(
        env!("CARGO_BIN_EXE_ballast-sample-app"),
        &["--listen", "127.0.0.2:0", "--pod", "web-1"],
    );
    let app_addr: std::net::SocketAddr = app
        .wait_for("listening on ", LIMIT)
        .parse()
        .expect("the app prints its address");
    let mut object = slice(
        "web-backends-a",
        "web-backends",
        &[("127.0.0.2", "web-1", true)],
    );
    object["ports"] = json!([{"name": "http", "port": app_addr.port(), "protocol": "TCP"}]);
    server.apply_value(object).unwrap();

    let dir = std::env::temp_dir().join(format!("ballast-kube-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    // The kubeconfig's namespace differs: --namespace must win.
    server.write_kubeconfig(&kubeconfig, "default").unwrap();
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1]));
    let admin = format!("127.0.0.1:{}", free_port([127, 0, 0, 1]));
    let proxy_path = workspace_bin("ballast-proxy");
    assert!(
        std::path::Path::new(&proxy_path).exists(),
        "build it first: cargo build -p ballast-proxy ({proxy_path})"
    );
    let proxy = Process::spawn_with_env(
        &proxy_path,
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--kube-service",
            "web-backends",
            "--namespace",
            NS,
            "--port-name",
            "http",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );

    let started = Instant::now();
    loop {
        if let Some((200, _)) = http_get(&admin, "/ready").await {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "/ready never became 200; the stand-in saw {:?}",
            server
                .requests()
                .iter()
                .map(|r| (r.verb, r.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, response) = http_get(&listen, "/hello").await.unwrap();
    assert_eq!(status, 200, "{response}");
    assert!(response.contains("web-1"), "served by the pod: {response}");
    eventually("the proxy's WATCH", || server.count(Verb::Watch) >= 1).await;
    assert!(
        of(&server, Verb::List)[0]
            .path
            .contains("/namespaces/shop/"),
        "--namespace is used"
    );

    // A deleted slice stops being routed: nothing left, so 503.
    server
        .delete::<EndpointSlice>(NS, "web-backends-a")
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some((503, _)) = http_get(&listen, "/hello").await {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "still routed after the slice was deleted"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(proxy);
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
}
