//! The data plane's threads: one single-threaded tokio runtime per worker.
//!
//! Client connections are accepted on the control runtime (which also runs discovery,
//! housekeeping and the admin listener) and handed to the workers in turn. A connection
//! then lives on its worker until it closes, and so does everything its requests start:
//! the upstream connection tasks hyper spawns, and the idle connections they go back to
//! (the pool keeps each worker's connections apart, see [`current`]). One request's
//! server side, client side and every wakeup between them stay on one thread, which a
//! work-stealing runtime cannot promise: there, handing a request to the upstream
//! connection's task often woke the other worker thread. The measured gain is in
//! docs/DESIGN.md ("Threads").

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;

/// Work handed to a worker.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker this code runs on, or `None` off the workers (the control runtime).
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// Running workers. Dropping this lets each worker finish what it holds and stop; the
/// tasks still running on a worker then (idle upstream connections) are cancelled.
#[derive(Debug)]
pub struct Workers {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    next: usize,
}

impl Workers {
    /// Starts `count` worker threads (at least one).
    ///
    /// # Errors
    /// When a thread or its runtime cannot be created.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut queues = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            std::thread::Builder::new()
                .name(format!("ballast-worker-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    runtime.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(job);
                        }
                    });
                })?;
            queues.push(tx);
        }
        Ok(Self { queues, next: 0 })
    }

    /// Runs `job` on the next worker in turn (skipping one that has died). Returns
    /// false when no worker is left.
    pub fn spawn(&mut self, job: impl Future<Output = ()> + Send + 'static) -> bool {
        let mut job: Job = Box::pin(job);
        for _ in 0..self.queues.len() {
            let queue = &self.queues[self.next];
            self.next = (self.next + 1) % self.queues.len();
            match queue.send(job) {
                Ok(()) => return true,
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_go_round_robin_and_know_their_worker() {
        let mut workers = Workers::start(2).unwrap();
        assert_eq!(current(), None);
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..4 {
            let tx = tx.clone();
            assert!(workers.spawn(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(current());
            }));
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(rx.recv().await.unwrap());
        }
        seen.sort();
        assert_eq!(seen, [Some(0), Some(0), Some(1), Some(1)]);
    }
}
