//! A request body that streams to the pod as it arrives and keeps a bounded copy of what
//! it sent, so that the request can be sent again to another pod when the first one
//! failed before answering (the way linkerd2-proxy's replay body and Envoy's retry buffer
//! work). Nothing waits for the body: the head goes out at once and each frame follows
//! when the client sends it, at the pace the pod reads it.
//!
//! Every attempt gets its own [`ReplayBody`] over one shared [`Replay`]: a retry first
//! re-sends the copy, then goes on reading the client. Once the body outgrows the limit
//! the copy is dropped and no further attempt can be made. An attempt's body that is
//! still polled after a newer attempt began (hyper may hold on to it for a moment) gets
//! an error rather than stealing the client's frames.

use crate::pool::BoxError;
use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use tokio::time::Instant;

/// The client's request body, shared by the attempts that send it.
#[derive(Debug)]
pub struct Replay<B> {
    state: Mutex<State<B>>,
}

#[derive(Debug)]
struct State<B> {
    /// The client's body; `None` once it ended or failed.
    client: Option<B>,
    /// Everything read so far, while it fits in `limit`.
    copy: Vec<Bytes>,
    copy_len: usize,
    limit: usize,
    /// The body outgrew `limit`: the copy is gone and no retry is possible.
    overflowed: bool,
    overflow_counter: Counter,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The client's body could not be read (bad chunking, a reset).
    client_failed: bool,
    /// Bytes read from the client.
    received: u64,
    /// When a frame last came from the client (the stream's idle clock).
    last_frame: Instant,
    /// The attempt whose body may read the client now.
    attempt: u32,
    /// Woken once when the client's body has ended (the response-head timer starts
    /// then).
    ended_waker: Option<Waker>,
}

/// One attempt's view of the shared body.
#[derive(Debug)]
pub struct ReplayBody<B> {
    replay: Arc<Replay<B>>,
    attempt: u32,
    /// Chunks of the copy this attempt has sent.
    replayed: usize,
    replayed_bytes: usize,
    trailers_sent: bool,
}

fn lock<B>(state: &Mutex<State<B>>) -> MutexGuard<'_, State<B>> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B> Replay<B> {
    /// Shares `client`'s body, keeping up to `limit` bytes for retries; a body that
    /// outgrows it increments `overflow_counter`.
    pub fn new(client: B, limit: usize, overflow_counter: Counter, now: Instant) -> Self {
        Self {
            state: Mutex::new(State {
                client: Some(client),
                copy: Vec::new(),
                copy_len: 0,
                limit,
                overflowed: false,
                overflow_counter,
                trailers: None,
                ended: false,
                client_failed: false,
                received: 0,
                last_frame: now,
                attempt: 0,
                ended_waker: None,
            }),
        }
    }

    /// The body for the next attempt, or `None` when the copy no longer holds all that
    /// was sent (the body outgrew the limit, or the client's body failed).
    pub fn next_attempt(self: &Arc<Self>) -> Option<ReplayBody<B>> {
        let mut state = lock(&self.state);
        if state.overflowed || state.client_failed {
            return None;
        }
        state.attempt += 1;
        Some(ReplayBody {
            replay: self.clone(),
            attempt: state.attempt,
            replayed: 0,
            replayed_bytes: 0,
            trailers_sent: false,
        })
    }

    /// Whether another attempt could still send the whole body.
    pub fn can_replay(&self) -> bool {
        let state = lock(&self.state);
        !state.overflowed && !state.client_failed
    }

    /// Whether the body outgrew the copy.
    pub fn overflowed(&self) -> bool {
        lock(&self.state).overflowed
    }

    /// Whether the client's own body failed (so an attempt's failure is the client's).
    pub fn client_failed(&self) -> bool {
        lock(&self.state).client_failed
    }

    /// Whether the client's body has ended.
    pub fn ended(&self) -> bool {
        lock(&self.state).ended
    }

    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        lock(&self.state).received
    }

    /// When the client last sent a frame.
    pub fn last_frame(&self) -> Instant {
        lock(&self.state).last_frame
    }

    /// Ready once the client's body has ended.
    pub fn poll_ended(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.state);
        if state.ended {
            return Poll::Ready(());
        }
        match &mut state.ended_waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Resolves once the client's body has ended.
    pub async fn wait_ended(&self) {
        std::future::poll_fn(|cx| self.poll_ended(cx)).await;
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let replay = this.replay.clone();
        let mut state = lock(&replay.state);
        if state.attempt != this.attempt {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        // A retry first sends again what the client already sent.
        if let Some(chunk) = state.copy.get(this.replayed) {
            let chunk = chunk.clone();
            this.replayed += 1;
            this.replayed_bytes += chunk.len();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if state.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(trailers) = state.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(client) = state.client.as_mut() else {
            return Poll::Ready(Some(Err("the client's request body failed".into())));
        };
        let polled = Pin::new(client).poll_frame(cx);
        let frame = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                state.client = None;
                state.ended = true;
                let waiting = state.ended_waker.take();
                drop(state);
                if let Some(waker) = waiting {
                    waker.wake();
                }
                this.trailers_sent = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                state.client = None;
                state.client_failed = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        state.last_frame = Instant::now();
        let frame = match frame.into_data() {
            Ok(data) => {
                state.received += data.len() as u64;
                if !state.overflowed {
                    if state.copy_len + data.len() > state.limit {
                        state.overflowed = true;
                        state.copy = Vec::new();
                        state.copy_len = 0;
                        state.overflow_counter.inc();
                    } else {
                        state.copy_len += data.len();
                        state.copy.push(data.clone());
                        this.replayed = state.copy.len();
                        this.replayed_bytes = state.copy_len;
                    }
                }
                Frame::data(data)
            }
            Err(frame) => {
                // Trailers end the body.
                if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                }
                this.trailers_sent = true;
                state.client = None;
                frame
            }
        };
        let client_done = state.client.as_ref().is_none_or(Body::is_end_stream);
        if client_done {
            state.client = None;
            state.ended = true;
            if state.trailers.is_none() {
                // Nothing after this frame: the attempt's body ends with it.
                this.trailers_sent = true;
            }
            let waiting = state.ended_waker.take();
            drop(state);
            if let Some(waker) = waiting {
                waker.wake();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.replay.state);
        state.attempt == self.attempt
            && state.ended
            && self.replayed >= state.copy.len()
            && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let state = lock(&self.replay.state);
        let pending_copy = state.copy_len.saturating_sub(self.replayed_bytes) as u64;
        if state.ended {
            return SizeHint::with_exact(pending_copy);
        }
        let client = state
            .client
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(client.lower() + pending_copy);
        if let Some(upper) = client.upper() {
            hint.set_upper(upper + pending_copy);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    type Sent = Result<Frame<Bytes>, BoxError>;
    type Client = StreamBody<futures::stream::BoxStream<'static, Sent>>;

    /// A client body fed frame by frame through the returned sender.
    fn client(limit: usize) -> (mpsc::UnboundedSender<Sent>, Arc<Replay<Client>>, Counter) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let body = StreamBody::new(Box::pin(frames) as futures::stream::BoxStream<'static, Sent>);
        let counter = Counter::default();
        let replay = Replay::new(body, limit, counter.clone(), Instant::now());
        (tx, Arc::new(replay), counter)
    }

    fn data(text: &'static str) -> Sent {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    async fn next(body: &mut ReplayBody<Client>) -> Option<Result<Frame<Bytes>, BoxError>> {
        tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("a frame or the end within 5 s")
    }

    fn text(frame: Option<Result<Frame<Bytes>, BoxError>>) -> String {
        let frame = frame.expect("a frame").expect("no error");
        String::from_utf8(frame.into_data().expect("data").to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn frames_pass_as_they_come_and_a_retry_sends_them_again() {
        let (tx, replay, counter) = client(1024);
        let mut first = replay.next_attempt().expect("first attempt");
        tx.send(data("ab")).unwrap();
        assert_eq!(text(next(&mut first).await), "ab", "no waiting for the end");
        assert!(!replay.ended());
        tx.send(data("cd")).unwrap();
        drop(tx);
        assert_eq!(text(next(&mut first).await), "cd");
        assert!(next(&mut first).await.is_none());
        assert!(replay.ended() && replay.can_replay());
        assert_eq!(replay.received(), 4);

        let mut second = replay.next_attempt().expect("a retry");
        assert_eq!(second.size_hint().exact(), Some(4));
        assert_eq!(text(next(&mut second).await), "ab");
        assert_eq!(text(next(&mut second).await), "cd");
        assert!(second.is_end_stream());
        assert!(next(&mut second).await.is_none());
        assert_eq!(counter.get(), 0);
    }

    #[tokio::test]
    async fn a_retry_mid_stream_replays_the_copy_then_reads_on_and_the_old_attempt_stops() {
        let (tx, replay, _) = client(1024);
        let mut first = replay.next_attempt().expect("first attempt");
        tx.send(data("ab")).unwrap();
        assert_eq!(text(next(&mut first).await), "ab");
        let mut second = replay.next_attempt().expect("a retry");
        assert!(
            next(&mut first).await.expect("a frame").is_err(),
            "the superseded attempt must not take the client's frames"
        );
        assert_eq!(text(next(&mut second).await), "ab");
        tx.send(data("cd")).unwrap();
        assert_eq!(text(next(&mut second).await), "cd");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(Frame::trailers(trailers))).unwrap();
        let frame = next(&mut second).await.unwrap().unwrap();
        assert_eq!(frame.trailers_ref().unwrap()["grpc-status"], "0");
        assert!(next(&mut second).await.is_none());

        // A third attempt gets the data and the trailers again.
        let mut third = replay.next_attempt().expect("another retry");
        assert_eq!(text(next(&mut third).await), "ab");
        assert_eq!(text(next(&mut third).await), "cd");
        let frame = next(&mut third).await.unwrap().unwrap();
        assert!(frame.is_trailers());
        assert!(next(&mut third).await.is_none());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_on_but_cannot_be_retried() {
        let (tx, replay, counter) = client(3);
        let mut first = replay.next_attempt().expect("first attempt");
        tx.send(data("ab")).unwrap();
        assert_eq!(text(next(&mut first).await), "ab");
        assert!(replay.can_replay());
        tx.send(data("cd")).unwrap();
        assert_eq!(text(next(&mut first).await), "cd", "still streamed");
        assert!(replay.overflowed() && !replay.can_replay());
        assert_eq!(counter.get(), 1);
        assert!(replay.next_attempt().is_none());
        tx.send(data("ef")).unwrap();
        drop(tx);
        assert_eq!(text(next(&mut first).await), "ef");
        assert!(next(&mut first).await.is_none());
        assert_eq!((replay.received(), counter.get()), (6, 1));
    }

    #[tokio::test]
    async fn a_broken_client_body_fails_the_attempt_and_allows_no_retry() {
        let (tx, replay, _) = client(1024);
        let mut first = replay.next_attempt().expect("first attempt");
        tx.send(data("ab")).unwrap();
        tx.send(Err("bad chunk size".into())).unwrap();
        assert_eq!(text(next(&mut first).await), "ab");
        assert!(next(&mut first).await.expect("a frame").is_err());
        assert!(replay.client_failed());
        assert!(replay.next_attempt().is_none());
    }

    #[tokio::test]
    async fn the_end_is_signalled_once_the_client_finishes() {
        let (tx, replay, _) = client(1024);
        let mut first = replay.next_attempt().expect("first attempt");
        let waiter = tokio::spawn({
            let replay = replay.clone();
            async move { replay.wait_ended().await }
        });
        tx.send(data("ab")).unwrap();
        assert_eq!(text(next(&mut first).await), "ab");
        assert!(!waiter.is_finished());
        drop(tx);
        assert!(next(&mut first).await.is_none());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken at the end")
            .unwrap();
    }
}
