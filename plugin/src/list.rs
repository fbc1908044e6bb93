//! `kubectl ballast list`: every BalancedService with the printer columns of
//! `kubectl get bsvc` plus the proxies and the pods draining now.

use ballast_api::BalancedService;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::render::{ago, table};

/// The header row.
pub const HEADER: [&str; 10] = [
    "NAMESPACE",
    "NAME",
    "PHASE",
    "READY",
    "UP-TO-DATE",
    "REVISION",
    "BALANCE",
    "PROXIES",
    "DRAINING",
    "AGE",
];

/// One row per BalancedService, sorted by namespace and name.
pub fn rows(services: &[BalancedService], now: Timestamp) -> Vec<[String; 10]> {
    let mut rows: Vec<[String; 10]> = services
        .iter()
        .map(|bs| {
            let status = bs.status.clone().unwrap_or_default();
            let draining = if status.draining.is_empty() {
                "0".to_owned()
            } else {
                let in_flight: i64 = status.draining.iter().map(|d| d.in_flight).sum();
                format!("{} ({in_flight} in flight)", status.draining.len())
            };
            [
                bs.namespace().unwrap_or_default(),
                bs.name_any(),
                status.phase.unwrap_or_else(|| "Pending".to_owned()),
                status
                    .ready
                    .unwrap_or_else(|| format!("0/{}", bs.spec.replicas)),
                status.updated_replicas.to_string(),
                status.update_revision.unwrap_or_else(|| "-".to_owned()),
                status
                    .balance
                    .map_or_else(|| "-".to_owned(), |b| b.max_over_mean),
                status.proxy.map_or_else(
                    || format!("0/{}", bs.spec.proxy.replicas),
                    |p| format!("{}/{}", p.ready_replicas, p.replicas),
                ),
                draining,
                bs.creation_timestamp()
                    .map_or_else(|| "-".to_owned(), |t| ago(t.0, now)),
            ]
        })
        .collect();
    rows.sort_by(|a, b| (&a[0], &a[1]).cmp(&(&b[0], &b[1])));
    rows
}

/// The table, header first.
pub fn render(rows: &[[String; 10]]) -> String {
    let mut all = vec![HEADER.map(str::to_owned)];
    all.extend_from_slice(rows);
    let mut out = String::new();
    table(&mut out, "", &all);
    out
}
