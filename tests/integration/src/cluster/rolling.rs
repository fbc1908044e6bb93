//! The Deployment controller's rolling update as one pure step: which pods to create
//! and which to delete, given the pods that exist now. Terminating pods count for
//! nothing (as in Kubernetes, whose ReplicaSets ignore pods being deleted), so a pod's
//! drain never holds the rollout back, only its own termination.

use std::time::Duration;

use super::plan::RolloutPlan;

/// One pod, as the rolling update sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodView {
    /// Created from the current template.
    pub current: bool,
    /// Ready for this long (None: not ready).
    pub ready_for: Option<Duration>,
    /// Being deleted.
    pub terminating: bool,
    /// `controller.kubernetes.io/pod-deletion-cost`: lower goes first among pods that
    /// are equally ready.
    pub deletion_cost: i64,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// New pods to create from the current template.
    pub create: u32,
    /// Indices (into the slice given to [`step`]) of pods to delete.
    pub delete: Vec<usize>,
}

/// One reconcile of the rolling update.
///
/// * Create current pods while fewer than `replicas` exist, keeping every active pod
///   within `replicas + max_surge`.
/// * Delete old pods while more than `replicas - max_unavailable` pods are available
///   (ready for `min_ready`); unready old pods go first, as they serve nothing.
/// * Delete current pods above `replicas` (a scale-down), unready first.
pub fn step(plan: &RolloutPlan, pods: &[PodView]) -> Step {
    let available = |p: &PodView| p.ready_for.is_some_and(|d| d >= plan.min_ready);
    let active: Vec<(usize, &PodView)> = pods
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.terminating)
        .collect();
    let current = active.iter().filter(|(_, p)| p.current).count() as u32;
    let total = active.len() as u32;
    let mut result = Step {
        create: plan
            .replicas
            .saturating_sub(current)
            .min((plan.replicas + plan.max_surge).saturating_sub(total)),
        delete: Vec::new(),
    };

    let min_available = plan.replicas.saturating_sub(plan.max_unavailable);
    let mut available_now = active.iter().filter(|(_, p)| available(p)).count() as u32;
    let old = by_preference(active.iter().copied().filter(|(_, p)| !p.current).collect());
    for (index, pod) in old {
        if !available(pod) {
            // Deleting it lowers no availability; keep the active count from dropping
            // below what is needed while new pods start.
            if total - result.delete.len() as u32 > min_available {
                result.delete.push(index);
            }
        } else if available_now > min_available {
            available_now -= 1;
            result.delete.push(index);
        }
    }
    if current > plan.replicas {
        let extra = by_preference(active.iter().copied().filter(|(_, p)| p.current).collect());
        result.delete.extend(
            extra
                .into_iter()
                .take((current - plan.replicas) as usize)
                .map(|(i, _)| i),
        );
    }
    result
}

/// The ReplicaSet controller's order: unready pods first, then the lowest deletion
/// cost, then the ones ready for the shortest time.
fn by_preference(mut list: Vec<(usize, &PodView)>) -> Vec<(usize, &PodView)> {
    list.sort_by_key(|(_, p)| {
        (
            p.ready_for.is_some(),
            p.deletion_cost,
            p.ready_for.unwrap_or(Duration::ZERO),
        )
    });
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    const SURGE_ONLY: RolloutPlan = RolloutPlan {
        replicas: 4,
        max_surge: 1,
        max_unavailable: 0,
        min_ready: Duration::from_secs(2),
    };

    fn pod(current: bool, ready_secs: Option<u64>) -> PodView {
        PodView {
            current,
            ready_for: ready_secs.map(Duration::from_secs),
            terminating: false,
            deletion_cost: 0,
        }
    }

    #[test]
    fn surge_only_creates_one_then_waits_for_it_to_be_available() {
        let old = vec![pod(false, Some(60)); 4];
        assert_eq!(
            step(&SURGE_ONLY, &old),
            Step {
                create: 1,
                delete: vec![]
            }
        );
        let mut pods = old.clone();
        pods.push(pod(true, Some(1)));
        assert_eq!(
            step(&SURGE_ONLY, &pods),
            Step::default(),
            "not yet min_ready"
        );
        pods[4] = pod(true, Some(2));
        let s = step(&SURGE_ONLY, &pods);
        assert_eq!((s.create, s.delete.len()), (0, 1));
        // The deleted pod no longer counts: the next pod can be created.
        pods[s.delete[0]].terminating = true;
        assert_eq!(step(&SURGE_ONLY, &pods).create, 1);
    }

    #[test]
    fn the_lowest_deletion_cost_goes_first_among_ready_pods() {
        let mut pods = vec![pod(false, Some(60)); 4];
        pods.push(pod(true, Some(5)));
        pods[1].deletion_cost = i64::from(i32::MIN);
        let s = step(&SURGE_ONLY, &pods);
        assert_eq!(s.delete, vec![1]);
        // An unready pod still goes before a retired ready one.
        pods[2].ready_for = None;
        assert_eq!(step(&SURGE_ONLY, &pods).delete[0], 2);
    }

    #[test]
    fn kubernetes_defaults_delete_before_replacements_are_up() {
        let plan = RolloutPlan {
            replicas: 8,
            max_surge: 2,
            max_unavailable: 2,
            min_ready: Duration::ZERO,
        };
        let s = step(&plan, &[pod(false, Some(60)); 8]);
        assert_eq!((s.create, s.delete.len()), (2, 2));
    }

    #[test]
    fn availability_never_drops_below_replicas_minus_max_unavailable() {
        // Random pod sets: after deleting what `step` says, at least
        // `replicas - max_unavailable` pods stay available (when that many were).
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let plan = RolloutPlan {
                replicas: rng.u32(1..10),
                max_surge: rng.u32(0..3),
                max_unavailable: rng.u32(0..3),
                min_ready: Duration::from_secs(1),
            };
            let pods: Vec<PodView> = (0..rng.usize(0..14))
                .map(|_| PodView {
                    current: rng.bool(),
                    ready_for: rng.bool().then(|| Duration::from_millis(rng.u64(0..3000))),
                    terminating: rng.u8(0..5) == 0,
                    deletion_cost: 0,
                })
                .collect();
            let available =
                |p: &PodView| !p.terminating && p.ready_for.is_some_and(|d| d >= plan.min_ready);
            let before = pods.iter().filter(|p| available(p)).count() as u32;
            let s = step(&plan, &pods);
            let after = pods
                .iter()
                .enumerate()
                .filter(|(i, p)| available(p) && !s.delete.contains(i))
                .count() as u32;
            let floor = plan.replicas.saturating_sub(plan.max_unavailable);
            let current = pods.iter().filter(|p| p.current && !p.terminating).count() as u32;
            if current <= plan.replicas {
                assert!(after >= floor.min(before), "{plan:?} {pods:?} {s:?}");
            }
            let active = pods.iter().filter(|p| !p.terminating).count() as u32;
            assert!(active + s.create <= (plan.replicas + plan.max_surge).max(active));
        }
    }
}
