#![allow(clippy::unwrap_used)]

use super::*;
use ballast_integration::load::LoadStats;
use ballast_integration::scenario::{ApiRequests, PodLine};

fn finished(variant: Variant) -> ScenarioReport {
    ScenarioReport {
        variant,
        load: LoadStats::default(),
        load_time: Duration::from_secs(12),
        balance_before: None,
        balance_after: None,
        rollout: Duration::from_secs(2),
        rollout_available: Duration::from_secs(2),
        pods_replaced: 8,
        pods_killed: 0,
        longest_pre_stop: Duration::ZERO,
        proxy_rollout: None,
        status: None,
        events: Vec::new(),
        api: ApiRequests::default(),
    }
}

fn live(phase: &str, sent: u64) -> Live {
    Live {
        phase: phase.to_owned(),
        load: LoadStats {
            sent,
            ..LoadStats::default()
        },
        ..Live::default()
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[test]
fn a_finished_variant_prints_its_counts_once_marked_final_and_then_nothing() {
    let variants = [Variant::Ballast, Variant::KubernetesDefaults];
    let mut progress = Progress::new(2);
    let start = progress.step(
        &variants,
        &[live("starting pods", 0), live("starting pods", 0)],
        secs(0.3),
    );
    assert_eq!(start.len(), 2, "{start:#?}");
    assert!(start[1].ends_with("kubernetes defaults  starting pods"));

    let counts = progress.step(
        &variants,
        &[live("steady load", 4000), live("steady load", 4100)],
        secs(10.1),
    );
    assert_eq!(counts.len(), 4, "phases and counts: {counts:#?}");
    assert!(counts[3].contains("requests 4100"), "{counts:#?}");

    let mut done = live("done", 6000);
    done.replaced = (8, 8);
    done.report = Some(finished(Variant::KubernetesDefaults));
    let last = progress.step(
        &variants,
        &[live("rolling out the app", 5000), done.clone()],
        secs(12.0),
    );
    assert_eq!(
        last,
        [
            "[ 12.0s] ballast              rolling out the app",
            "[ 12.0s] kubernetes defaults  done",
            "[ 12.0s] kubernetes defaults  final: requests 6000 failed 0 ws broken 0  old pods stopped 8/8",
        ]
    );

    // Every 10 s after that, only the variant still running.
    for t in [20.2, 30.3, 40.4] {
        let lines = progress.step(
            &variants,
            &[live("rolling out the app", 9000), done.clone()],
            secs(t),
        );
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("ballast") && lines[0].contains("requests 9000"));
    }
    assert!(!progress.all_finished());
    // A finished variant's clock stopped when it finished.
    assert_eq!(progress.elapsed(1, secs(40.4)), secs(12.0));
    assert_eq!(progress.elapsed(0, secs(40.4)), secs(40.4));

    let mut failed = live("rolling out the app", 9500);
    failed.error = Some("the app rollout did not finish".to_owned());
    let lines = progress.step(&variants, &[failed, done], secs(41.0));
    assert_eq!(
        lines,
        ["[ 41.0s] ballast              final: requests 9500 failed 0 ws broken 0"]
    );
    assert!(progress.all_finished());
}

#[test]
fn the_live_view_and_its_pod_legend_fit_120_columns() {
    assert!(POD_LEGEND.chars().count() <= 120, "{POD_LEGEND}");
    // Every mark the view draws is in the legend.
    for mark in ["+ new", "x terminating", ". not ready", "no mark"] {
        assert!(POD_LEGEND.contains(mark), "{mark}");
    }
    // Larger than a demo gets (--rate 5000 for half an hour).
    let mut l = live("rolling out the app", 9_999_999);
    l.load.failed = 999_999;
    l.load.ws_completed = 99_999;
    l.load.ws_broken = 99_999;
    l.load.ws_long_closed = 99_999;
    l.replaced = (200, 200);
    l.proxies = (2, 3);
    l.pods = (0..12)
        .map(|n| PodLine {
            // 200 pods (the most --pods takes) rolled once: serials up to about 400.
            name: format!("demo-abcde-{}", 390 + n),
            new: n % 2 == 0,
            ready: n % 3 != 0,
            terminating: n % 4 == 0,
        })
        .collect();
    // One pod takes everything: the widest percentage.
    let share: BTreeMap<String, f64> = l
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.clone(), if i == 0 { 1.0 } else { 0.0 }))
        .collect();
    let frame = render(
        Variant::SleepInsteadOfGate(300),
        "ballast's proxies, but the usual preStop sleep instead of the drain gate",
        &l,
        &share,
        secs(1234.5),
    );
    for line in frame.lines() {
        let visible = line
            .replace("\x1b[1m", "")
            .replace("\x1b[31m", "")
            .replace("\x1b[0m", "");
        assert!(
            visible.chars().count() <= 120,
            "{} columns: {visible}",
            visible.chars().count()
        );
    }
    assert!(
        frame.contains("xabcde-390") && frame.contains("100.0%"),
        "{frame}"
    );
}
