//! A stand-in for the Kubernetes API server's read path, speaking its wire format over
//! real HTTP on a loopback address, so ballast's own Kubernetes code runs through kube's
//! real client and watcher in tests. It is a test harness, never presented as
//! Kubernetes.
//!
//! What it serves, for any JSON object type registered with it (EndpointSlices, Pods,
//! ReplicaSets, ...), namespaced or not:
//!
//! * GET of one object, and LIST with `labelSelector` / `fieldSelector` filtering,
//!   answering `{"kind":"<Kind>List","apiVersion":...,"metadata":{"resourceVersion":...},
//!   "items":[...]}` with items without kind/apiVersion, as the real server does (`limit`
//!   is ignored: everything fits on one page, which the API allows);
//! * WATCH (`?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`,
//!   and `sendInitialEvents=true` for streaming lists) as a chunked stream of JSON lines
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`: the changes after N
//!   replayed from a bounded history, then live ones; a selector-aware watch sees an
//!   object that starts or stops matching as ADDED or DELETED; a version older than the
//!   history gets a `410 Gone` ERROR event with an `Expired` Status, as a real server
//!   answers after compaction.
//!
//! What a test controls: the objects ([`ApiServer::apply`], [`ApiServer::delete`]),
//! bookmarks, compaction, 410s and clean ends on open watches, a partition (open
//! watches end and new requests wait until it heals), HTTP errors or dropped connections
//! for the next requests ([`ApiServer::fail_next`]), and a log of every request
//! ([`ApiServer::requests`]).
//!
//! Writes over HTTP (`write`): POST, PUT with its resourceVersion precondition, PATCH
//! as server-side apply, merge or strategic merge, on objects and their `status`, and
//! DELETE, with generation and creation time kept as the API server keeps them: enough
//! for a controller to run against it. Left out: field ownership and conflicts between
//! field managers, defaulting, validation, admission, authentication, pagination,
//! `resourceVersionMatch` (answers are always the most recent state, which satisfies
//! every match rule the watcher uses).

pub mod merge;
mod selector;
mod store;
mod write;

use crate::lock;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use selector::{Selector, query_params};
use store::{Collection, Expired, ObjectKey, Store};

/// Changes kept for watches to replay; a watch from further back gets 410 Gone.
const HISTORY: usize = 1000;

/// An object type the stand-in serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceType {
    /// `group/version`, or `v1` for the core group.
    pub api_version: String,
    /// `EndpointSlice`, `Pod`, ...
    pub kind: String,
    /// The URL segment: `endpointslices`, `pods`, ...
    pub plural: String,
}

impl ResourceType {
    /// The type of a k8s-openapi (or kube-derived) resource.
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Self {
        Self {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            plural: K::plural(&()).into_owned(),
        }
    }
}

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// GET of a collection.
    List,
    /// GET of a collection with `watch=true`.
    Watch,
    /// GET of one object.
    Get,
    /// POST of a new object.
    Create,
    /// PUT of an object or its status.
    Update,
    /// PATCH (server-side apply, merge or strategic merge) of an object or its status.
    Patch,
    /// DELETE of one object.
    Delete,
    /// Anything else (answered 404 or 405).
    Other,
}

/// How an injected failure answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP error with a Status body (500, 503, 429, ...).
    Status(u16),
    /// The connection closes without an answer.
    Drop,
}

/// One request the stand-in answered.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// What it asked for.
    pub verb: Verb,
    /// URL path.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// HTTP status answered (0 when the connection was dropped).
    pub status: u16,
    /// When it was answered (a watch: when its stream started).
    pub at: Instant,
}

/// A running stand-in; it stops (and ends every watch) when dropped.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    signals: watch::Sender<Signals>,
    faults: Mutex<BTreeMap<Verb, VecDeque<Fault>>>,
    requests: Mutex<Vec<RequestRecord>>,
}

/// What open watches react to; each counter is bumped once per occurrence.
#[derive(Clone, Debug, Default)]
struct Signals {
    changes: u64,
    bookmarks: u64,
    closes: u64,
    expiries: u64,
    partitioned: bool,
    stopped: bool,
}

/// A response body: one JSON document, or a watch's stream of JSON lines.
enum ApiBody {
    Full(Option<Bytes>),
    Lines(mpsc::Receiver<Bytes>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            Self::Lines(rx) => rx
                .poll_recv(cx)
                .map(|line| line.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(body) => SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Lines(_) => SizeHint::default(),
        }
    }
}

impl ApiServer {
    /// Listens on `ip` (a loopback address), on a free port.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(ip: std::net::IpAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(HISTORY)),
            signals: watch::Sender::new(Signals::default()),
            faults: Mutex::new(BTreeMap::new()),
            requests: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL, as a kubeconfig's `server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration for it, with `namespace` as the default namespace.
    ///
    /// # Errors
    /// Never for a running server (its URL always parses).
    pub fn kube_config(&self, namespace: &str) -> Result<kube::Config, String> {
        let url: hyper::Uri = self.url().parse().map_err(|e| format!("{e}"))?;
        let mut config = kube::Config::new(url);
        namespace.clone_into(&mut config.default_namespace);
        Ok(config)
    }

    /// A kube client for it, with `namespace` as the default namespace.
    ///
    /// # Errors
    /// When kube cannot build the client.
    pub fn client(&self, namespace: &str) -> Result<kube::Client, String> {
        kube::Client::try_from(self.kube_config(namespace)?).map_err(|e| e.to_string())
    }

    /// Writes a kubeconfig for it (no credentials, `namespace` in the context), for a
    /// process started with `KUBECONFIG` pointing at it.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n    \
             namespace: {namespace}\ncurrent-context: stand-in\nusers:\n- name: stand-in\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// Serves `K`'s collection (empty until objects are applied).
    pub fn serve<K: kube::Resource<DynamicType = ()>>(&self) {
        self.serve_type(ResourceType::of::<K>());
    }

    /// Serves an object type by its description.
    pub fn serve_type(&self, resource: ResourceType) {
        lock(&self.shared.store).register(resource);
    }

    /// Creates or replaces `object` (its type is served from now on); returns its new
    /// resourceVersion.
    ///
    /// # Errors
    /// When the object does not serialize or has no name.
    pub fn apply<K>(&self, object: &K) -> Result<u64, String>
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        self.serve::<K>();
        let mut value = serde_json::to_value(object).map_err(|e| e.to_string())?;
        // k8s-openapi writes apiVersion/kind; kube-derived types may leave them out.
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        self.apply_value(value)
    }

    /// Creates or replaces a JSON object naming its apiVersion and kind (of a served
    /// type); returns its new resourceVersion.
    ///
    /// # Errors
    /// When the type is not served or the object has no name.
    pub fn apply_value(&self, object: Value) -> Result<u64, String> {
        let rv = lock(&self.shared.store).apply(object)?;
        self.signal(|s| s.changes += 1);
        Ok(rv)
    }

    /// Deletes a `K` (`namespace` "" when cluster-scoped); returns the version of the
    /// deletion, None when there was no such object.
    pub fn delete<K: kube::Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<u64> {
        self.delete_of(&ResourceType::of::<K>(), namespace, name)
    }

    /// [`ApiServer::delete`] by type description.
    pub fn delete_of(&self, resource: &ResourceType, namespace: &str, name: &str) -> Option<u64> {
        let key = ObjectKey {
            api_version: resource.api_version.clone(),
            plural: resource.plural.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let rv = lock(&self.shared.store).delete(&key)?;
        self.signal(|s| s.changes += 1);
        Some(rv)
    }

    /// The stored `K` named `name`.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let resource = ResourceType::of::<K>();
        let key = ObjectKey {
            api_version: resource.api_version,
            plural: resource.plural,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let value = lock(&self.shared.store).get(&key).cloned()?;
        serde_json::from_value(value).ok()
    }

    /// The stored objects of a type in `namespace`, as JSON.
    pub fn list_values(&self, resource: &ResourceType, namespace: &str) -> Vec<Value> {
        let collection = Collection {
            resource: resource.clone(),
            namespace: Some(namespace.to_owned()),
            selector: Selector::default(),
        };
        lock(&self.shared.store)
            .list(&collection)
            .into_iter()
            .cloned()
            .collect()
    }

    /// One stored object, as JSON.
    pub fn get_value(&self, resource: &ResourceType, namespace: &str, name: &str) -> Option<Value> {
        let key = ObjectKey {
            api_version: resource.api_version.clone(),
            plural: resource.plural.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        lock(&self.shared.store).get(&key).cloned()
    }

    /// The last resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version
    }

    /// Forgets the change history (etcd compaction): a watch resuming from before now
    /// gets 410 Gone and must list again.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
        self.signal(|s| s.changes += 1);
    }

    /// Sends a `410 Gone` ERROR event on every open watch and ends it (the watch cache
    /// dropped them).
    pub fn expire_watches(&self) {
        self.signal(|s| s.expiries += 1);
    }

    /// Ends every open watch cleanly (as a timeout or an idle cut by a load balancer
    /// does).
    pub fn close_watches(&self) {
        self.signal(|s| s.closes += 1);
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch that
    /// allowed bookmarks.
    pub fn bookmark(&self) {
        self.signal(|s| s.bookmarks += 1);
    }

    /// Cuts clients off: open watches end, new requests wait until [`ApiServer::heal`].
    pub fn partition(&self) {
        self.signal(|s| {
            s.partitioned = true;
            s.closes += 1;
        });
    }

    /// Ends a partition: waiting requests are answered.
    pub fn heal(&self) {
        self.signal(|s| s.partitioned = false);
    }

    /// The next `times` requests of `verb` fail with `fault`.
    pub fn fail_next(&self, verb: Verb, fault: Fault, times: usize) {
        lock(&self.shared.faults)
            .entry(verb)
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests of `verb` were answered (failed ones included).
    pub fn count(&self, verb: Verb) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.verb == verb)
            .count()
    }

    fn signal(&self, change: impl FnOnce(&mut Signals)) {
        self.shared.signals.send_modify(change);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.signal(|s| s.stopped = true);
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&shared), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A parsed request path.
struct Target {
    api_version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    /// `status` for `.../<name>/status`.
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ((*version).to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name, subresource) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Target {
        api_version,
        plural: plural.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn json_response(code: u16, body: &Value) -> Response<ApiBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(ApiBody::Full(Some(Bytes::from(bytes))));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(code: u16, message: &str) -> Response<ApiBody> {
    let reason = match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    json_response(code, &status_body(code, reason, message))
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let query = query_params(req.uri().query());
    let target = parse_path(&path);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&target, req.method()) {
        (Some(t), &Method::GET) if t.name.is_some() => Verb::Get,
        (Some(_), &Method::GET) if watching => Verb::Watch,
        (Some(_), &Method::GET) => Verb::List,
        (Some(t), &Method::POST) if t.name.is_none() => Verb::Create,
        (Some(t), &Method::PUT) if t.name.is_some() => Verb::Update,
        (Some(t), &Method::PATCH) if t.name.is_some() => Verb::Patch,
        (Some(t), &Method::DELETE) if t.name.is_some() => Verb::Delete,
        _ => Verb::Other,
    };
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = if matches!(verb, Verb::Create | Verb::Update | Verb::Patch) {
        use http_body_util::BodyExt;
        req.into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes()
    } else {
        Bytes::new()
    };
    // A partitioned client's requests hang until the network heals.
    let mut signals = shared.signals.subscribe();
    loop {
        let now = signals.borrow_and_update().clone();
        if now.stopped {
            return Err(std::io::Error::other("the stand-in stopped"));
        }
        if !now.partitioned {
            break;
        }
        if signals.changed().await.is_err() {
            return Err(std::io::Error::other("the stand-in stopped"));
        }
    }
    let record = |status: u16| {
        lock(&shared.requests).push(RequestRecord {
            verb,
            path: path.clone(),
            query: query.clone(),
            status,
            at: Instant::now(),
        });
    };
    let fault = lock(&shared.faults)
        .get_mut(&verb)
        .and_then(VecDeque::pop_front);
    match fault {
        Some(Fault::Drop) => {
            record(0);
            return Err(std::io::Error::other("injected connection drop"));
        }
        Some(Fault::Status(code)) => {
            record(code);
            return Ok(error_response(code, "injected failure"));
        }
        None => {}
    }
    let response = if matches!(
        verb,
        Verb::Create | Verb::Update | Verb::Patch | Verb::Delete
    ) {
        answer_write(&shared, verb, target, &content_type, &body)
    } else {
        answer(&shared, verb, target, &query)
    };
    record(response.status().as_u16());
    Ok(response)
}

fn answer_write(
    shared: &Arc<Shared>,
    verb: Verb,
    target: Option<Target>,
    content_type: &str,
    body: &[u8],
) -> Response<ApiBody> {
    let Some(target) = target else {
        return error_response(404, "the server could not find the requested resource");
    };
    let (code, value) = {
        let mut store = lock(&shared.store);
        let Some(resource) = store.resource(&target.api_version, &target.plural).cloned() else {
            return error_response(404, "the server could not find the requested resource");
        };
        if target.subresource.as_deref().is_some_and(|s| s != "status") {
            return error_response(404, "only the status subresource is served");
        }
        write::write(
            &mut store,
            &write::Write {
                verb,
                resource: &resource,
                namespace: target.namespace.as_deref(),
                name: target.name.as_deref(),
                status_only: target.subresource.is_some(),
                content_type,
                body,
            },
        )
    };
    if code < 300 {
        shared.signals.send_modify(|s| s.changes += 1);
    }
    json_response(code, &value)
}

fn answer(
    shared: &Arc<Shared>,
    verb: Verb,
    target: Option<Target>,
    query: &BTreeMap<String, String>,
) -> Response<ApiBody> {
    let Some(target) = target else {
        return error_response(404, "the server could not find the requested resource");
    };
    if verb == Verb::Other {
        return error_response(405, "method not allowed here");
    }
    let store = lock(&shared.store);
    let Some(resource) = store.resource(&target.api_version, &target.plural).cloned() else {
        return error_response(404, "the server could not find the requested resource");
    };
    if let Some(name) = &target.name {
        let key = ObjectKey {
            api_version: resource.api_version.clone(),
            plural: resource.plural.clone(),
            namespace: target.namespace.clone().unwrap_or_default(),
            name: name.clone(),
        };
        return match store.get(&key) {
            Some(object) => json_response(200, object),
            None => error_response(404, &format!("{} {name:?} not found", resource.plural)),
        };
    }
    let selector = match Selector::parse(
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    ) {
        Ok(selector) => selector,
        Err(message) => return error_response(400, &message),
    };
    let collection = Collection {
        resource,
        namespace: target.namespace,
        selector,
    };
    if verb == Verb::List {
        let items: Vec<Value> = store
            .list(&collection)
            .into_iter()
            .map(|o| {
                let mut item = o.clone();
                if let Some(map) = item.as_object_mut() {
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                item
            })
            .collect();
        return json_response(
            200,
            &json!({
                "kind": format!("{}List", collection.resource.kind),
                "apiVersion": collection.resource.api_version,
                "metadata": {"resourceVersion": store.resource_version.to_string()},
                "items": items,
            }),
        );
    }
    let since = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return error_response(400, &format!("invalid resourceVersion {v:?}")),
        },
    };
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    let params = WatchParams {
        since,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events_end: flag("sendInitialEvents"),
        timeout: query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs),
    };
    drop(store);
    let (tx, rx) = mpsc::channel(64);
    // The watch is open from the moment it is answered: a signal sent after that (an
    // expiry, a close) reaches it even if its task has not run yet.
    let mut signals = shared.signals.subscribe();
    let start = signals.borrow_and_update().clone();
    tokio::spawn(stream_watch(
        Arc::clone(shared),
        collection,
        params,
        tx,
        (signals, start),
    ));
    let mut response = Response::new(ApiBody::Lines(rx));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

struct WatchParams {
    /// None: start with the current state as ADDED events.
    since: Option<u64>,
    bookmarks: bool,
    /// Streaming list: mark the end of the initial events with a bookmark.
    initial_events_end: bool,
    timeout: Option<Duration>,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark(resource: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata}),
    )
}

fn gone(expired: Expired) -> Bytes {
    line(
        "ERROR",
        &status_body(
            410,
            "Expired",
            &format!(
                "too old resource version: {} ({})",
                expired.requested, expired.oldest
            ),
        ),
    )
}

async fn stream_watch(
    shared: Arc<Shared>,
    collection: Collection,
    params: WatchParams,
    tx: mpsc::Sender<Bytes>,
    (mut signals, start): (watch::Receiver<Signals>, Signals),
) {
    let deadline = params
        .timeout
        .map(|t| tokio::time::Instant::now() + t)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
    let mut position = match params.since {
        Some(rv) => rv,
        None => {
            let (lines, rv) = {
                let store = lock(&shared.store);
                let lines: Vec<Bytes> = store
                    .list(&collection)
                    .into_iter()
                    .map(|o| line("ADDED", o))
                    .collect();
                (lines, store.resource_version)
            };
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if params.initial_events_end
                && params.bookmarks
                && tx
                    .send(bookmark(&collection.resource, rv, true))
                    .await
                    .is_err()
            {
                return;
            }
            rv
        }
    };
    let mut bookmarks_seen = start.bookmarks;
    loop {
        let now = signals.borrow_and_update().clone();
        if now.stopped || now.closes != start.closes {
            return;
        }
        if now.expiries != start.expiries {
            let oldest = lock(&shared.store).resource_version;
            let _ = tx
                .send(gone(Expired {
                    requested: position,
                    oldest,
                }))
                .await;
            return;
        }
        let batch = {
            let store = lock(&shared.store);
            store
                .events_since(&collection, position)
                .map(|events| (events, store.resource_version))
        };
        match batch {
            Err(expired) => {
                let _ = tx.send(gone(expired)).await;
                return;
            }
            Ok((events, rv)) => {
                for (kind, object) in events {
                    if tx.send(line(kind, &object)).await.is_err() {
                        return;
                    }
                }
                position = rv;
            }
        }
        if now.bookmarks != bookmarks_seen {
            bookmarks_seen = now.bookmarks;
            if params.bookmarks
                && tx
                    .send(bookmark(&collection.resource, position, false))
                    .await
                    .is_err()
            {
                return;
            }
        }
        tokio::select! {
            changed = signals.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
        }
    }
}
