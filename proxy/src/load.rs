//! Pure load arithmetic: peak-EWMA latency, slow start, outlier ejection and the retry
//! budget. Every function takes `now`, so tests drive time explicitly.

use std::time::Duration;
use tokio::time::Instant;

/// Peak-EWMA estimate of an endpoint's latency: jumps up at once to a slower sample,
/// falls back gradually with time, and decays towards zero while no sample arrives so
/// an endpoint that was slow once gets tried again.
#[derive(Clone, Copy, Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    sampled: bool,
    updated: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    /// Starts at `initial`.
    pub fn new(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: initial.as_nanos() as f64,
            sampled: false,
            updated: now,
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    /// Records one observed latency (request sent to response head). A slower sample
    /// is taken at once; a faster one pulls the estimate down by at least half of the
    /// gap. The first sample, and any sample after [`STALE_AFTER`] without one, replaces
    /// the estimate: an initial guess or a stall seconds ago says nothing about now.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = nanos(rtt);
        let current = self.estimate(now);
        self.estimate_ns = if !self.sampled || self.is_stale(now) || rtt > current {
            rtt
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.updated));
            let keep = (-elapsed / self.decay_ns).exp().min(MAX_KEEP);
            current * keep + rtt * (1.0 - keep)
        };
        self.updated = now;
        self.sampled = true;
    }

    /// Replaces the estimate with a probe's sample: the probe was sent because the old
    /// estimate had kept the endpoint out of rotation, and only a fresh sample can say
    /// whether that was deserved.
    pub fn reset_to(&mut self, rtt: Duration, now: Instant) {
        self.estimate_ns = nanos(rtt);
        self.updated = now;
        self.sampled = true;
    }

    /// True when no sample arrived for [`STALE_AFTER`]: the estimate may be stale (a
    /// one-off stall, a pod that recovered) and is worth one probe request.
    pub fn is_stale(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.updated) >= STALE_AFTER
    }

    /// False until the first sample: the estimate is still the initial guess.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// The estimate in nanoseconds at `now`.
    pub fn estimate(&self, now: Instant) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(self.updated));
        self.estimate_ns * (-elapsed / self.decay_ns).exp()
    }
}

/// `duration` in nanoseconds, as a float: without `as_nanos`'s 128-bit integer, whose
/// conversion is a library call on the request path.
fn nanos(duration: Duration) -> f64 {
    duration.as_secs() as f64 * 1e9 + f64::from(duration.subsec_nanos())
}

/// An estimate without a sample for this long is stale: the endpoint gets a probe
/// request and the probe's sample replaces the estimate. Bounds how long a one-off stall
/// keeps a pod out of rotation; a really slow pod costs one probe a second.
pub const STALE_AFTER: Duration = Duration::from_secs(1);

/// Selections an endpoint may sit out, per candidate, before it gets a probe request.
const PROBE_TURNS_PER_CANDIDATE: u64 = 8;

/// Whether an endpoint that lost every selection for the last `missed` selections (made
/// among `candidates` endpoints) is due a probe request, after `streak` probes in a row
/// without winning a selection on its own.
///
/// One noisy latency sample (a scheduling hiccup of a few ms against pods that answer in
/// 0.3 ms) prices a healthy pod out of every comparison; waiting for [`STALE_AFTER`]
/// then costs it a second of traffic, a visible imbalance. Counting missed turns instead
/// re-measures it after a few dozen selections at any request rate. A pod that really is
/// slow keeps losing: each probe that does not win it traffic back doubles the wait for
/// the next, so its probes soon thin out to the once-a-second floor.
pub fn probe_due(missed: u64, candidates: usize, streak: u32) -> bool {
    let gap = PROBE_TURNS_PER_CANDIDATE
        .saturating_mul(candidates as u64)
        .saturating_mul(1u64.checked_shl(streak).unwrap_or(u64::MAX));
    missed > gap
}

/// Largest share of the old estimate a faster sample keeps.
const MAX_KEEP: f64 = 0.5;

/// Slow-start weight of an endpoint of age `age`: ramps linearly from 0.1 to 1.0 over
/// `warmup`; 1.0 without warmup.
pub fn warmup_weight(age: Duration, warmup: Duration) -> f64 {
    if warmup.is_zero() || age >= warmup {
        1.0
    } else {
        0.1 + 0.9 * age.as_secs_f64() / warmup.as_secs_f64()
    }
}

/// Outlier-ejection policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject; 0 disables ejection.
    pub consecutive_failures: u32,
    /// First ejection's length; the n-th lasts n times this.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
    /// Most endpoints ejected at once, as a share of all (at most one half).
    pub max_ejected_ratio: f64,
}

/// Failure bookkeeping of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Times this endpoint has been ejected.
    pub ejections: u32,
}

impl Health {
    /// A success resets the failure streak.
    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
    }

    /// Counts a failure; returns how long to eject the endpoint for, if at all.
    /// `may_eject` is false when enough endpoints are ejected already.
    pub fn record_failure(&mut self, policy: &EjectionPolicy, may_eject: bool) -> Option<Duration> {
        self.consecutive_failures += 1;
        if policy.consecutive_failures == 0
            || self.consecutive_failures < policy.consecutive_failures
            || !may_eject
        {
            return None;
        }
        self.consecutive_failures = 0;
        self.ejections += 1;
        Some(policy.base.saturating_mul(self.ejections).min(policy.max))
    }
}

/// True when one more endpoint may be ejected: never more than the policy's share of
/// `total`, and never the last one.
pub fn may_eject(ejected_now: usize, total: usize, policy: &EjectionPolicy) -> bool {
    let limit = (total as f64 * policy.max_ejected_ratio.min(0.5)).floor() as usize;
    ejected_now < limit && ejected_now + 1 < total
}

/// Retry budget: retries may be at most `ratio` of the requests in the current window
/// plus a floor of `min_per_second`, so retries cannot multiply load in an outage.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_window: f64,
    window: Duration,
    state: std::sync::Mutex<BudgetWindow>,
}

#[derive(Debug)]
struct BudgetWindow {
    started: Instant,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    /// A budget of `ratio` (0.2 = 20%) plus `min_per_second`, over 10-second windows.
    pub fn new(ratio: f64, min_per_second: u32, now: Instant) -> Self {
        let window = Duration::from_secs(10);
        Self {
            ratio,
            floor_per_window: f64::from(min_per_second) * window.as_secs_f64(),
            window,
            state: std::sync::Mutex::new(BudgetWindow {
                started: now,
                requests: 0,
                retries: 0,
            }),
        }
    }

    /// Counts an original request.
    pub fn record_request(&self, now: Instant) {
        let mut state = self.lock(now);
        state.requests += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut state = self.lock(now);
        let allowed = state.requests as f64 * self.ratio + self.floor_per_window;
        if (state.retries as f64) < allowed {
            state.retries += 1;
            true
        } else {
            false
        }
    }

    fn lock(&self, now: Instant) -> std::sync::MutexGuard<'_, BudgetWindow> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_duration_since(state.started) >= self.window {
            *state = BudgetWindow {
                started: now,
                requests: 0,
                retries: 0,
            };
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn probes_come_after_missed_turns_and_back_off_while_they_lose() {
        // 8 candidates: due after 64 missed selections, then 128, 256, ...
        assert!(!probe_due(64, 8, 0));
        assert!(probe_due(65, 8, 0));
        assert!(!probe_due(128, 8, 1));
        assert!(probe_due(129, 8, 1));
        assert!(!probe_due(1000, 8, 4));
        assert!(probe_due(1025, 8, 4));
        // A long streak saturates instead of overflowing: only the time floor is left.
        assert!(!probe_due(u64::MAX - 1, 8, 64));
        assert!(!probe_due(u64::MAX - 1, 8, 200));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_decays_down() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(30 * MS, Duration::from_secs(10), start);
        assert!((ewma.estimate(start) - 30e6).abs() < 1.0);
        ewma.observe(300 * MS, start);
        assert!(
            (ewma.estimate(start) - 300e6).abs() < 1.0,
            "a slow sample is taken at once"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let later = Instant::now();
        let decayed = ewma.estimate(later);
        assert!(
            (decayed - 300e6 / std::f64::consts::E).abs() < 1e3,
            "decays with e^(-t/tau): {decayed}"
        );
        ewma.observe(MS, later);
        assert!(ewma.estimate(later) < decayed, "a fast sample lowers it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_forgotten_at_the_first_sample_after_it_went_stale() {
        let mut ewma = PeakEwma::new(30 * MS, Duration::from_secs(10), Instant::now());
        ewma.observe(MS, Instant::now());
        assert!(
            (ewma.estimate(Instant::now()) - 1e6).abs() < 1.0,
            "the first sample replaces the guess"
        );
        ewma.observe(50 * MS, Instant::now());
        tokio::time::advance(Duration::from_millis(500)).await;
        ewma.observe(MS, Instant::now());
        assert!(
            ewma.estimate(Instant::now()) > 20e6,
            "within a second the stall still counts"
        );
        tokio::time::advance(STALE_AFTER).await;
        assert!(ewma.is_stale(Instant::now()));
        ewma.observe(MS, Instant::now());
        assert!(
            (ewma.estimate(Instant::now()) - 1e6).abs() < 1.0,
            "a probe after a second replaces it"
        );
    }

    #[test]
    fn warmup_ramps_from_a_tenth_to_full() {
        let warmup = Duration::from_secs(10);
        assert!((warmup_weight(Duration::ZERO, warmup) - 0.1).abs() < 1e-9);
        assert!((warmup_weight(Duration::from_secs(5), warmup) - 0.55).abs() < 1e-9);
        assert_eq!(warmup_weight(Duration::from_secs(11), warmup), 1.0);
        assert_eq!(warmup_weight(Duration::ZERO, Duration::ZERO), 1.0);
    }

    #[test]
    fn ejection_after_consecutive_failures_grows_and_caps() {
        let policy = EjectionPolicy {
            consecutive_failures: 3,
            base: Duration::from_secs(30),
            max: Duration::from_secs(75),
            max_ejected_ratio: 0.5,
        };
        let mut health = Health::default();
        assert_eq!(health.record_failure(&policy, true), None);
        health.record_success();
        assert_eq!(health.record_failure(&policy, true), None);
        assert_eq!(health.record_failure(&policy, true), None);
        assert_eq!(
            health.record_failure(&policy, true),
            Some(Duration::from_secs(30))
        );
        for _ in 0..2 {
            health.record_failure(&policy, true);
        }
        assert_eq!(
            health.record_failure(&policy, true),
            Some(Duration::from_secs(60))
        );
        for _ in 0..2 {
            health.record_failure(&policy, true);
        }
        assert_eq!(
            health.record_failure(&policy, true),
            Some(Duration::from_secs(75)),
            "capped"
        );
        for _ in 0..5 {
            assert_eq!(
                health.record_failure(&policy, false),
                None,
                "not when the limit is reached"
            );
        }
    }

    #[test]
    fn never_more_than_half_ejected_nor_the_last_one() {
        let policy = EjectionPolicy {
            consecutive_failures: 1,
            base: Duration::from_secs(1),
            max: Duration::from_secs(1),
            max_ejected_ratio: 0.5,
        };
        assert!(may_eject(0, 8, &policy));
        assert!(may_eject(3, 8, &policy));
        assert!(!may_eject(4, 8, &policy));
        assert!(!may_eject(0, 1, &policy));
        assert!(may_eject(0, 2, &policy));
        assert!(!may_eject(1, 2, &policy));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_ratio_plus_floor_per_window() {
        let budget = RetryBudget::new(0.2, 1, Instant::now());
        for _ in 0..100 {
            budget.record_request(Instant::now());
        }
        let granted = (0..100)
            .filter(|_| budget.try_retry(Instant::now()))
            .count();
        assert_eq!(granted, 20 + 10, "20% of 100 plus 1/s over a 10 s window");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            budget.try_retry(Instant::now()),
            "a new window has its floor again"
        );
    }
}
