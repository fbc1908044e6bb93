#![allow(clippy::unwrap_used)]

use super::*;
use crate::load::LoadStats;
use crate::scenario::{ApiRequests, Variant};
use ballast_api::status::{RevisionCounts, RolloutSummary};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;

/// A finished variant: `sent` requests over `load_secs` seconds of load, with the rest
/// set to `n` (counts) and `secs` (durations).
fn report(variant: Variant, sent: u64, load_secs: u64, n: u64, secs: u64) -> ScenarioReport {
    let status = variant != Variant::KubernetesDefaults;
    ScenarioReport {
        variant,
        load: LoadStats {
            sent,
            failed: n,
            failures: BTreeMap::from([("connection refused", n), ("reset", n)]),
            ws_broken: n,
            ws_long_closed: n,
            ..LoadStats::default()
        },
        load_time: Duration::from_secs(load_secs),
        balance_before: Some(12.34),
        balance_after: Some(56.78),
        rollout: Duration::from_secs(secs),
        rollout_available: Duration::from_secs(secs),
        pods_replaced: 200,
        pods_killed: 0,
        longest_pre_stop: Duration::from_secs(secs),
        proxy_rollout: status.then(|| Duration::from_secs(secs)),
        status: status.then(|| RolloutSummary {
            revision: "abc".to_owned(),
            previous_revision: None,
            started_at: Time(Default::default()),
            finished_at: None,
            duration_seconds: secs as i64,
            pods_drained: 200,
            longest_drain_millis: 0,
            forced_terminations: 200,
            requests: RevisionCounts::default(),
            failed_requests: RevisionCounts {
                old_revision: n as i64,
                new_revision: n as i64,
            },
            paused: None,
        }),
        events: Vec::new(),
        api: ApiRequests::default(),
    }
}

fn variants() -> [Variant; 3] {
    [
        Variant::Ballast,
        Variant::KubernetesDefaults,
        Variant::SleepInsteadOfGate(30),
    ]
}

#[test]
fn the_table_and_its_legend_fit_120_columns_with_large_numbers() {
    let [a, b, c] = variants().map(|v| report(v, 9_999_999_999, 1000, 9_999_999, 99_999));
    let text = table(&[&a, &b, &c]);
    let widest = text.lines().map(|l| l.chars().count()).max().unwrap();
    assert!(widest <= MAX_WIDTH, "{widest} columns:\n{text}");
    assert!(text.contains("9999999"), "{text}");
}

#[test]
fn requests_compare_as_a_rate_over_each_variants_own_load_time() {
    // The same 500 req/s, one variant loaded for 60 s and another for 25 s.
    let ballast = report(Variant::Ballast, 30_000, 60, 0, 20);
    let defaults = report(Variant::KubernetesDefaults, 12_500, 25, 11, 2);
    let text = table(&[&ballast, &defaults]);
    let rows: Vec<&str> = text.lines().skip(2).take(2).collect();
    for row in &rows {
        let cells: Vec<&str> = row.split("  ").filter(|c| !c.is_empty()).collect();
        assert_eq!(cells[1].trim(), "500.0", "{text}");
    }
    assert!(!text.contains("30000") && !text.contains("12500"), "{text}");
}

#[test]
fn the_header_names_every_column_the_legend_explains() {
    let [a, b, c] = variants().map(|v| report(v, 5000, 10, 1, 10));
    let text = table(&[&a, &b, &c]);
    let header: Vec<&str> = text.lines().next().unwrap().split("  ").collect();
    let header: Vec<&str> = header
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .collect();
    assert_eq!(header, HEADER);
    for column in &HEADER[1..] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{column}  "))),
            "no legend line for {column:?}:\n{text}"
        );
    }
    assert!(text.contains("balance    busiest pod's"));
    assert!(text.contains("12.34/56.78"));
}

#[test]
fn status_and_failure_lines_name_their_variant_and_only_variants_with_an_operator_have_status() {
    let [a, b, c] = variants().map(|v| report(v, 5000, 10, 3, 10));
    let text = table(&[&a, &b, &c]);
    assert!(text.contains("status     ballast: 200 pods drained, 200 forced, 6 failed requests"));
    assert!(text.contains("status     preStop sleep 30: 200 pods drained"));
    assert!(!text.contains("status     kubernetes defaults"));
    assert!(text.contains("failed     kubernetes defaults: connection refused 3, reset 3"));
    // The defaults have no proxies to roll.
    let defaults_row = text
        .lines()
        .find(|l| l.starts_with("kubernetes defaults"))
        .unwrap();
    assert!(defaults_row.ends_with(" -"), "{defaults_row}");
}
