//! The time limits of one request: the response-head limit, the idle limit and the
//! gRPC deadline, and the wait for a response head under them.

use crate::replay::Replay;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// The time limits of one request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// From the end of the request body to the response head.
    pub(super) response_head: Option<Duration>,
    /// No frame either way for this long.
    pub(super) idle: Option<Duration>,
    /// The gRPC client's deadline.
    pub(super) deadline: Option<Instant>,
    /// The request is a gRPC call: errors are answered the gRPC way.
    pub(super) grpc: bool,
}

/// Which limit cut a request or a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum Timeout {
    #[error("no response head within {0:?} of the end of the request")]
    ResponseHead(Duration),
    #[error("no frame in either direction for {0:?}")]
    Idle(Duration),
    #[error("the call's grpc-timeout passed")]
    Deadline,
}

impl Timeout {
    /// The `kind` label of `ballast_stream_timeouts_total`.
    pub(super) fn kind(self) -> &'static str {
        match self {
            Self::ResponseHead(_) => "response-head",
            Self::Idle(_) => "idle",
            Self::Deadline => "deadline",
        }
    }
}

/// The next limit due: the earliest of the deadline, the response-head limit once the
/// request has ended, and the idle limit after the last frame.
pub(super) fn next_limit(
    limits: &Limits,
    request_ended: Option<Instant>,
    last_frame: Instant,
) -> Option<(Instant, Timeout)> {
    let mut next: Option<(Instant, Timeout)> = None;
    let mut consider = |at: Instant, timeout: Timeout| {
        if next.is_none_or(|(earliest, _)| at < earliest) {
            next = Some((at, timeout));
        }
    };
    if let Some(at) = limits.deadline {
        consider(at, Timeout::Deadline);
    }
    if let (Some(limit), Some(ended)) = (limits.response_head, request_ended) {
        consider(ended + limit, Timeout::ResponseHead(limit));
    }
    if let Some(limit) = limits.idle {
        consider(last_frame + limit, Timeout::Idle(limit));
    }
    next
}

/// Waits for a response head within the request's limits. The response-head limit
/// starts when the request body has ended (a client-streaming call or a slow upload
/// is not the pod's delay); while it streams, only the deadline and the idle limit
/// apply. Returns the head and when the pod's turn began: the end of the request body,
/// or `sent` when the head came first.
///
/// Written with `poll_fn` and one timer rather than `select!` over helper futures: this
/// future is part of every request's, and its size is copied as the request moves.
pub(super) async fn wait_for_head<F: std::future::Future>(
    mut head: Pin<&mut F>,
    limits: &Limits,
    replay: Option<&Replay<Incoming>>,
    sent: Instant,
) -> Result<(F::Output, Instant), Timeout> {
    let mut request_ended = match replay {
        Some(replay) if !replay.ended() => None,
        _ => Some(sent),
    };
    let first = next_limit(limits, request_ended, sent);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(
        first.map_or(sent + Duration::from_secs(86_400), |(at, _)| at)
    ));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = head.as_mut().poll(cx) {
            return Poll::Ready(Ok((output, request_ended.unwrap_or(sent))));
        }
        if request_ended.is_none()
            && let Some(replay) = replay
            && replay.poll_ended(cx).is_ready()
        {
            request_ended = Some(Instant::now());
        }
        loop {
            let last_frame = replay.map_or(sent, |r| r.last_frame().max(sent));
            let Some((at, timeout)) = next_limit(limits, request_ended, last_frame) else {
                return Poll::Pending;
            };
            if at <= Instant::now() {
                return Poll::Ready(Err(timeout));
            }
            // The due time moves later with frames and earlier only when the request
            // ends (the response-head limit starts).
            if timer.deadline() != at && (timer.is_elapsed() || at < timer.deadline()) {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn limits(deadline: Option<Instant>) -> Limits {
        Limits {
            response_head: Some(Duration::from_secs(60)),
            idle: Some(Duration::from_secs(300)),
            deadline,
            grpc: false,
        }
    }

    #[test]
    fn the_response_head_limit_starts_only_when_the_request_has_ended() {
        let t0 = Instant::now();
        let streaming = next_limit(&limits(None), None, t0);
        assert_eq!(
            streaming,
            Some((
                t0 + Duration::from_secs(300),
                Timeout::Idle(Duration::from_secs(300))
            )),
            "while the body streams only the idle limit runs"
        );
        let ended = t0 + Duration::from_secs(10);
        assert_eq!(
            next_limit(&limits(None), Some(ended), t0),
            Some((
                ended + Duration::from_secs(60),
                Timeout::ResponseHead(Duration::from_secs(60))
            ))
        );
    }

    #[test]
    fn the_earliest_limit_wins_and_a_frame_moves_the_idle_one() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(250);
        assert_eq!(
            next_limit(&limits(Some(deadline)), Some(t0), t0),
            Some((deadline, Timeout::Deadline))
        );
        let quiet = Limits {
            response_head: None,
            idle: Some(Duration::from_secs(1)),
            deadline: None,
            grpc: true,
        };
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            next_limit(&quiet, None, later),
            Some((
                later + Duration::from_secs(1),
                Timeout::Idle(Duration::from_secs(1))
            ))
        );
        let none = Limits {
            response_head: None,
            idle: None,
            deadline: None,
            grpc: false,
        };
        assert_eq!(next_limit(&none, Some(t0), t0), None);
    }
}
