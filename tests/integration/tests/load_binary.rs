//! `ballast-load`, the load generator the real-cluster e2e runs in a pod: it must count
//! what it sent, what failed and who served it, or the e2e's "0 failures" means nothing.

#![allow(clippy::unwrap_used)]

use ballast_integration::Process;
use std::process::Command;
use std::time::Duration;

fn load(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_ballast-load"))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn counts_requests_failures_and_pods() {
    let app = Process::spawn(
        env!("CARGO_BIN_EXE_ballast-sample-app"),
        &["--listen", "127.0.0.2:0", "--pod", "pod-a"],
    );
    let addr = app.wait_for("listening on ", Duration::from_secs(20));
    let ok = load(&[
        "--target",
        &format!("http://{addr}/"),
        "--rate",
        "100",
        "--clients",
        "4",
        "--duration-secs",
        "2",
        "--long-every",
        "10",
        "--long-ms",
        "50",
    ]);
    let sent = ok["sent"].as_u64().unwrap();
    assert!(
        (150..=210).contains(&sent),
        "about 200 at 100/s for 2 s: {ok}"
    );
    assert_eq!(ok["failed"], 0, "{ok}");
    assert_eq!(ok["served_by"]["pod-a"], sent, "{ok}");

    let failing = load(&[
        "--target",
        &format!("http://{addr}/?status=503"),
        "--rate",
        "20",
        "--duration-secs",
        "1",
    ]);
    assert_eq!(failing["failed"], failing["sent"], "{failing}");
    assert_eq!(failing["by_status"]["503"], failing["sent"], "{failing}");
    drop(app);

    let refused = load(&[
        "--target",
        &format!("http://{addr}/"),
        "--rate",
        "10",
        "--clients",
        "1",
        "--duration-secs",
        "1",
    ]);
    assert!(refused["failed"].as_u64().unwrap() > 0, "{refused}");
    assert_eq!(refused["ok"], 0, "{refused}");
}
