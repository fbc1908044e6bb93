//! The thinnest reverse proxy hyper makes: the floor `bench/` measures ballast-proxy
//! against, to tell the cost of ballast's own work (balancing, drain accounting, header
//! rules, limits, metrics) from the cost of the HTTP stack under it.
//!
//! Built like ballast-proxy, minus everything ballast adds: one single-threaded runtime
//! per worker, client connections served by hyper's HTTP/1 server, upstream connections
//! made with hyper's HTTP/1 client connection API and kept in a per-worker keep-alive
//! pool, a backend picked round-robin per request. No header rewriting, no timeouts, no
//! retries, no metrics, no limits: not something to put in front of anything.
//!
//! ```text
//! cargo build --release -p ballast-proxy --example hyper_floor
//! target/release/examples/hyper_floor LISTEN BACKEND[,BACKEND...] [WORKERS]
//! ```

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, backends) = match args.as_slice() {
        [listen, backends, ..] => (listen.parse::<SocketAddr>()?, backends),
        _ => return Err("usage: hyper_floor LISTEN BACKEND[,BACKEND...] [WORKERS]".into()),
    };
    let backends = backends
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let workers = match args.get(2) {
        Some(n) => n.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    eprintln!("listening on {listen} with {workers} workers");
    let threads = (0..workers)
        .map(|_| {
            let (listener, backends) = (listener.try_clone()?, backends.clone());
            Ok(std::thread::spawn(move || worker(listener, backends)))
        })
        .collect::<Result<Vec<_>, std::io::Error>>()?;
    for thread in threads {
        thread.join().map_err(|_| "worker panicked")??;
    }
    Ok(())
}

/// One worker: accepts on its copy of the listener (the kernel spreads connections over
/// the workers waiting on it) and serves what it accepted.
fn worker(listener: std::net::TcpListener, backends: Vec<SocketAddr>) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let pool = Rc::new(Pool {
            idle: RefCell::new(backends.iter().map(|_| Vec::new()).collect()),
            backends,
            next: Cell::new(0),
        });
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |request| {
                    let pool = pool.clone();
                    async move { pool.forward(request).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// Keep-alive connections of one worker, per backend.
struct Pool {
    backends: Vec<SocketAddr>,
    idle: RefCell<Vec<Vec<http1::SendRequest<Incoming>>>>,
    next: Cell<usize>,
}

impl Pool {
    async fn forward(
        self: Rc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Returning>, BoxError> {
        let index = self.next.get() % self.backends.len();
        self.next.set(index + 1);
        let mut sender = match self.take(index) {
            Some(sender) => sender,
            None => self.connect(index).await?,
        };
        let (mut parts, body) = request.into_parts();
        if parts.uri.authority().is_some() {
            let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = path.parse::<Uri>()?;
        }
        let response = sender
            .send_request(Request::from_parts(parts, body))
            .await?;
        Ok(response.map(|body| Returning {
            body,
            home: Some((sender, self, index)),
        }))
    }

    fn take(&self, index: usize) -> Option<http1::SendRequest<Incoming>> {
        let mut idle = self.idle.borrow_mut();
        while let Some(sender) = idle[index].pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self, index: usize) -> Result<http1::SendRequest<Incoming>, BoxError> {
        let stream = tokio::net::TcpStream::connect(self.backends[index]).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::task::spawn_local(conn);
        Ok(sender)
    }
}

/// A response body that puts its connection back in the pool when it ends.
struct Returning {
    body: Incoming,
    home: Option<(http1::SendRequest<Incoming>, Rc<Pool>, usize)>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.go_home();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Returning {
    fn go_home(&mut self) {
        if let Some((sender, pool, index)) = self.home.take() {
            pool.idle.borrow_mut()[index].push(sender);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-response: not reusable.
        if self.body.is_end_stream() {
            self.go_home();
        }
    }
}
