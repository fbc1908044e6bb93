//! Scale check: validate + build + status for many BalancedServices, no cluster.
//! Run by `bench/operator-scale.sh`; prints one table row.

use ballast_api::BalancedService;
use ballast_operator::build::{BuildContext, build};
use ballast_operator::status::{Observed, compute};
use ballast_operator::validate::{Limits, validate};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Instant;

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let services: Vec<BalancedService> = (0..count)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "ballast.dev/v1alpha1",
                "kind": "BalancedService",
                "metadata": {"name": format!("svc-{i}"), "namespace": format!("team-{}", i % 50), "uid": format!("uid-{i}"), "generation": 1},
                "spec": {
                    "replicas": 2 + (i % 8) as i32,
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                    "template": {"spec": {"containers": [{"name": "app", "image": format!("app:{i}"), "ports": [{"name": "http", "containerPort": 8080}]}]}}
                }
            }))
            .expect("valid")
        })
        .collect();
    let ctx = BuildContext {
        proxy_image: "ghcr.io/ballast-dev/ballast:bench".to_owned(),
        operator_namespace: "ballast-system".to_owned(),
    };
    let limits = Limits::default();
    let started = Instant::now();
    let mut objects = 0;
    let mut bytes = 0;
    for bs in &services {
        let valid = validate(bs, None, &limits).expect("valid spec");
        let owned = build(&valid, &ctx);
        let docs = owned.to_documents().expect("serializes");
        objects += docs.len();
        bytes += docs.iter().map(|d| d.to_string().len()).sum::<usize>();
        let observed = Observed {
            app: Some(owned.app_deployment),
            proxy: Some(owned.proxy_deployment),
            ..Observed::default()
        };
        let _ = compute(
            bs,
            &observed,
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
    }
    let took = started.elapsed();
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0);
    println!(
        "| {count} | {objects} | {:.1} | {:.1} | {:.1} | {hwm:.1} |",
        took.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1e6 / count as f64,
        bytes as f64 / 1048576.0
    );
}
