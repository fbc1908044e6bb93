//! The election against a small Lease store speaking the API's wire semantics (404 on a
//! missing lease, 409 on a create race or a stale resourceVersion), on a paused clock.

use super::*;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tower_test::mock;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/ballast-operator";

/// The API server's view of the one Lease.
#[derive(Debug, Default)]
struct Store {
    lease: Mutex<Option<Value>>,
    version: AtomicU64,
    /// Answer every write with 500 (the holder's connection to the API is gone).
    fail_writes: AtomicBool,
}

impl Store {
    fn holder(&self) -> Option<String> {
        let lease = self.lease.lock().unwrap();
        lease.as_ref()?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }

    fn transitions(&self) -> i64 {
        let lease = self.lease.lock().unwrap();
        lease.as_ref().unwrap()["spec"]["leaseTransitions"]
            .as_i64()
            .unwrap_or(0)
    }

    /// Another replica writes the lease (holding it now).
    fn write_as(&self, holder: &str) {
        let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        *self.lease.lock().unwrap() = Some(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ballast-operator", "namespace": "ops",
                         "resourceVersion": rv.to_string()},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": "2026-12-03T00:00:00.000000Z", "leaseTransitions": 3},
        }));
    }

    fn answer(&self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
        assert_eq!(path.split('?').next().unwrap().trim_end_matches('/'), {
            if *method == Method::POST {
                PATH.rsplit_once('/').unwrap().0
            } else {
                PATH
            }
        });
        let mut lease = self.lease.lock().unwrap();
        let status = |code: StatusCode, reason: &str| {
            (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "reason": reason, "code": code.as_u16(),
                       "message": reason}),
            )
        };
        let store = |lease: &mut Option<Value>, mut object: Value| {
            let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            object["metadata"]["namespace"] = "ops".into();
            *lease = Some(object.clone());
            (StatusCode::OK, object)
        };
        match *method {
            Method::GET => match lease.clone() {
                Some(l) => (StatusCode::OK, l),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            },
            _ if self.fail_writes.load(Ordering::SeqCst) => {
                status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
            }
            Method::POST if lease.is_some() => status(StatusCode::CONFLICT, "AlreadyExists"),
            Method::POST => store(&mut lease, serde_json::from_slice(body).unwrap()),
            Method::PUT => {
                let object: Value = serde_json::from_slice(body).unwrap();
                let current = lease
                    .as_ref()
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                if current != Some(object["metadata"]["resourceVersion"].clone()) {
                    return status(StatusCode::CONFLICT, "Conflict");
                }
                store(&mut lease, object)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
        }
    }
}

/// A client whose requests the store answers.
fn client(store: &Arc<Store>) -> Client {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let store = store.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let (code, value) = store.answer(&parts.method, &parts.uri.to_string(), &bytes);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap(),
            );
        }
    });
    Client::new(service, "default")
}

/// Sets the flag while the work runs, clears it when the work is dropped.
struct Leading(Arc<AtomicBool>);

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn work(
    flag: Arc<AtomicBool>,
) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    move || {
        let flag = flag.clone();
        Box::pin(async move {
            flag.store(true, Ordering::SeqCst);
            let _leading = Leading(flag);
            std::future::pending::<()>().await;
        })
    }
}

fn election(store: &Arc<Store>, identity: &str) -> Election {
    Election::new(client(store), "ops", identity, Timing::default()).unwrap()
}

/// Waits (on the paused clock) until `flag` is `want`; returns when that happened.
async fn until(flag: &AtomicBool, want: bool) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    while flag.load(Ordering::SeqCst) != want {
        assert!(Instant::now() < deadline, "flag never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_cannot_renew_stops_before_a_standby_may_start() {
    let store = Arc::new(Store::default());
    let leading = Arc::new(AtomicBool::new(false));
    let a = election(&store, "a");
    let task = tokio::spawn({
        let work = work(leading.clone());
        async move { a.run(work, std::future::pending()).await }
    });
    until(&leading, true).await;
    assert_eq!(store.holder().as_deref(), Some("a"));

    // Renewals keep the term going.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(leading.load(Ordering::SeqCst));

    // The API becomes unreachable for writes: the holder must have stopped before the
    // lease could expire for a standby (15 s after the last renewal).
    let cut = Instant::now();
    store.fail_writes.store(true, Ordering::SeqCst);
    let stopped = until(&leading, false).await;
    let took = stopped - cut;
    assert!(
        took <= Duration::from_secs(12) && took >= Duration::from_secs(8),
        "stopped after {took:?}"
    );
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_only_once_the_holder_stops_renewing() {
    let store = Arc::new(Store::default());
    store.write_as("other");
    let leading = Arc::new(AtomicBool::new(false));
    let b = election(&store, "b");
    let task = tokio::spawn({
        let work = work(leading.clone());
        async move { b.run(work, std::future::pending()).await }
    });
    // The other holder renews every 2 s for a minute: b never leads.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        store.write_as("other");
        assert!(!leading.load(Ordering::SeqCst));
    }
    // It stops renewing: b takes over once the record stood still for the duration.
    let silent = Instant::now();
    let took = until(&leading, true).await - silent;
    assert!(
        took >= Duration::from_secs(15) && took <= Duration::from_secs(20),
        "took over after {took:?}"
    );
    assert_eq!(store.holder().as_deref(), Some("b"));
    assert_eq!(store.transitions(), 4);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_the_lease_so_a_standby_takes_over_at_once() {
    let store = Arc::new(Store::default());
    let (a_leading, b_leading) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn({
        let election = election(&store, "a");
        let work = work(a_leading.clone());
        async move {
            election
                .run(work, async {
                    let _ = stopped.await;
                })
                .await;
        }
    });
    until(&a_leading, true).await;
    let b = tokio::spawn({
        let election = election(&store, "b");
        let work = work(b_leading.clone());
        async move { election.run(work, std::future::pending()).await }
    });
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!b_leading.load(Ordering::SeqCst), "b waits while a renews");

    let at = Instant::now();
    stop.send(()).unwrap();
    a.await.unwrap();
    assert!(!a_leading.load(Ordering::SeqCst));
    let took = until(&b_leading, true).await - at;
    assert!(took <= Duration::from_secs(3), "b took over after {took:?}");
    assert_eq!(store.holder().as_deref(), Some("b"));
    b.abort();
}

#[tokio::test]
async fn a_renew_deadline_as_long_as_the_lease_is_refused() {
    let timing = Timing {
        renew_deadline: Duration::from_secs(15),
        ..Timing::default()
    };
    let (service, _handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    assert!(Election::new(client, "ops", "a", timing).is_err());
}
