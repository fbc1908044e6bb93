//! Leader election on a coordination.k8s.io Lease, in the shape of client-go's
//! leaderelection: only the holder reconciles; it renews every `retry` and steps down
//! the moment its last successful renewal is older than `renew_deadline` (before a
//! standby may take the lease at `duration`), so there are never two writers; a standby
//! takes a lease whose record has not changed for `duration`, measured on its own clock
//! (no trust in clocks across machines); on shutdown the holder releases the lease, so a
//! standby takes over at once instead of after `duration`.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use std::future::Future;
use std::pin::pin;
use std::time::Duration;
use tokio::time::Instant;

/// Lease name shared by all operator replicas.
pub const LEASE_NAME: &str = "ballast-operator";

/// Timing of an election; the defaults are client-go's.
#[derive(Clone, Debug)]
pub struct Timing {
    /// How long a lease stays valid after its last change: the longest a standby waits.
    pub duration: Duration,
    /// The holder stops reconciling when it could not renew for this long. Shorter
    /// than `duration`, so it has stopped before anybody else may start.
    pub renew_deadline: Duration,
    /// Pause between renewals, and between a standby's reads.
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// One replica's side of the election.
#[derive(Clone, Debug)]
pub struct Election {
    api: Api<Lease>,
    identity: String,
    timing: Timing,
}

/// Why the election cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The timing cannot keep one writer: the renew deadline must be shorter than the
    /// lease duration.
    #[error(
        "renew deadline {renew_deadline:?} must be shorter than the lease duration {duration:?}"
    )]
    InvalidTiming {
        /// The lease duration.
        duration: Duration,
        /// The renew deadline.
        renew_deadline: Duration,
    },
}

/// Why a term as leader ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Another replica holds the lease now.
    Taken(String),
    /// No renewal succeeded within the renew deadline.
    RenewDeadline,
}

impl Election {
    /// An election for `identity` on the Lease [`LEASE_NAME`] in `namespace`.
    ///
    /// # Errors
    /// When `timing` cannot keep a single writer.
    pub fn new(
        client: Client,
        namespace: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Self, ElectionError> {
        if timing.renew_deadline >= timing.duration {
            return Err(ElectionError::InvalidTiming {
                duration: timing.duration,
                renew_deadline: timing.renew_deadline,
            });
        }
        Ok(Self {
            api: Api::namespaced(client, namespace),
            identity: identity.to_owned(),
            timing,
        })
    }

    /// Runs `work()` while this replica holds the lease; drops it the moment the term
    /// ends and waits to win the lease again. Returns when `shutdown` completes, after
    /// releasing the lease if it held it.
    pub async fn run<F, Fut>(&self, mut work: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut shutdown = pin!(shutdown);
        loop {
            let lease = tokio::select! {
                lease = self.acquire() => lease,
                () = &mut shutdown => return,
            };
            tracing::info!(identity = %self.identity, "acquired the lease: reconciling");
            tokio::select! {
                () = work() => {
                    tracing::warn!("controller stopped while leading; giving the lease up");
                    self.release().await;
                    tokio::time::sleep(self.timing.retry).await;
                }
                end = self.hold(lease) => {
                    tracing::warn!(identity = %self.identity, reason = ?end, "lost the lease: stopped reconciling");
                }
                () = &mut shutdown => {
                    self.release().await;
                    return;
                }
            }
        }
    }

    /// Waits until this replica holds the lease, and returns it.
    async fn acquire(&self) -> Lease {
        // The record last read and when it was first seen: a holder that stops renewing
        // leaves the record unchanged, and `duration` of that on our own clock frees it.
        let mut seen: Option<(Option<String>, Instant)> = None;
        loop {
            match self.api.get_opt(LEASE_NAME).await {
                Ok(None) => match self.api.create(&PostParams::default(), &self.fresh()).await {
                    Ok(lease) => return lease,
                    // Another replica created it first: read it next round.
                    Err(e) => tracing::debug!(error = %e, "creating the lease failed"),
                },
                Ok(Some(lease)) => {
                    let version = lease.metadata.resource_version.clone();
                    let now = Instant::now();
                    let since = match &seen {
                        Some((v, since)) if *v == version => *since,
                        _ => now,
                    };
                    seen = Some((version, since));
                    if self.may_take(&lease, now.duration_since(since)) {
                        match self
                            .api
                            .replace(LEASE_NAME, &PostParams::default(), &self.taken(lease))
                            .await
                        {
                            Ok(lease) => return lease,
                            // 409: somebody changed it meanwhile; look again.
                            Err(e) => tracing::debug!(error = %e, "taking the lease failed"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the lease failed"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// True when this replica may take `lease`, whose record has not changed for
    /// `unchanged`.
    fn may_take(&self, lease: &Lease, unchanged: Duration) -> bool {
        let spec = lease.spec.as_ref();
        match spec.and_then(|s| s.holder_identity.as_deref()) {
            None | Some("") => true,
            Some(holder) if holder == self.identity => true,
            Some(_) => {
                let duration = spec
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.timing.duration, Duration::from_secs);
                unchanged >= duration
            }
        }
    }

    /// Renews `lease` every `retry` until the term ends.
    async fn hold(&self, mut lease: Lease) -> TermEnd {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let mut next = lease.clone();
            next.spec.get_or_insert_default().renew_time = Some(MicroTime(Timestamp::now()));
            match self
                .api
                .replace(LEASE_NAME, &PostParams::default(), &next)
                .await
            {
                Ok(current) => {
                    lease = current;
                    renewed = Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease failed");
                    // A conflict may mean another holder: check before trying again.
                    if let Ok(current) = self.api.get(LEASE_NAME).await {
                        let holder = current
                            .spec
                            .as_ref()
                            .and_then(|s| s.holder_identity.clone());
                        if holder.as_deref() != Some(self.identity.as_str()) {
                            return TermEnd::Taken(holder.unwrap_or_default());
                        }
                        lease = current;
                    }
                }
            }
            if renewed.elapsed() >= self.timing.renew_deadline {
                return TermEnd::RenewDeadline;
            }
        }
    }

    /// Gives the lease up if this replica holds it; best effort.
    async fn release(&self) {
        let Ok(mut lease) = self.api.get(LEASE_NAME).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(identity = %self.identity, "released the lease"),
            Err(e) => {
                tracing::warn!(error = %e, "releasing the lease failed; a standby takes it when it expires")
            }
        }
    }

    fn record(&self, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: i32::try_from(self.timing.duration.as_secs()).ok(),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn fresh(&self) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(self.record(0)),
        }
    }

    fn taken(&self, mut lease: Lease) -> Lease {
        let spec = lease.spec.take().unwrap_or_default();
        let same = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mut record = self.record(if same { transitions } else { transitions + 1 });
        if same {
            record.acquire_time = spec.acquire_time;
        }
        lease.spec = Some(record);
        lease
    }
}

#[cfg(test)]
mod tests;
