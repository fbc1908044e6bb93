//! The `ballast-proxy` binary as users run it: flags, signals, and real app processes
//! (`ballast-sample-app`) as backends on distinct loopback addresses.

use ballast_integration::{Process, free_port, workspace_bin};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const START: Duration = Duration::from_secs(20);

fn app(ip: &str) -> (Process, String) {
    let app = Process::spawn(
        env!("CARGO_BIN_EXE_ballast-sample-app"),
        &["--listen", &format!("{ip}:0")],
    );
    let addr = app.wait_for("listening on ", START);
    (app, addr)
}

fn proxy_bin() -> String {
    // The proxy binary is another package's; cargo builds it for the workspace test run.
    let path = workspace_bin("ballast-proxy");
    assert!(
        std::path::Path::new(&path).exists(),
        "build it first: cargo build -p ballast-proxy ({path})"
    );
    path
}

async fn wait_ready(admin: &str) {
    for _ in 0..400 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream
                .write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = String::new();
            let _ = stream.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("proxy at {admin} never became ready");
}

#[test]
fn invalid_configuration_fails_at_start_with_one_line_per_problem() {
    let output = std::process::Command::new(proxy_bin())
        .args([
            "--listen",
            "nowhere",
            "--retry-attempts",
            "0",
            "--algorithm",
            "round-robin",
        ])
        .env_clear()
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("ballast-proxy: --") || l.starts_with("ballast-proxy: one of")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy_and_sigterm_exits_cleanly() {
    let (_a, a) = app("127.0.0.2");
    let (_b, b) = app("127.0.0.3");
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1]));
    let admin = format!("127.0.0.1:{}", free_port([127, 0, 0, 1]));
    let log = std::env::temp_dir().join(format!("ballast-ws-access-{}.log", std::process::id()));
    let endpoints = format!("{a},{b}");
    let mut proxy = Process::spawn(
        &proxy_bin(),
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--endpoints",
            &endpoints,
            // No delay: the log must still be complete when the process exits.
            "--shutdown-delay",
            "0s",
            "--drain-timeout",
            "3s",
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    wait_ready(&admin).await;

    let stream = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{listen}/ws"), stream)
        .await
        .expect("upgrade through the proxy");
    assert_eq!(response.status(), 101);
    for text in ["one", "two", "three"] {
        ws.send(Message::text(text)).await.unwrap();
        let echo = tokio::time::timeout(START, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo, Message::text(text));
    }
    ws.close(None).await.unwrap();
    drop(ws);

    proxy.sigterm();
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit 0 after SIGTERM"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn ballast_drain_installs_itself_and_runs_the_pods_own_pre_stop_after_a_bounded_wait() {
    let dir = std::env::temp_dir().join(format!("ballast-drain-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new(workspace_bin("ballast-drain"))
        .args(["install", dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let installed = dir.join("ballast-drain");
    let marker = dir.join("user-pre-stop-ran");
    // No proxy answers on this address: the helper waits for the timeout, says why,
    // exits 0 (the pod must stop), and then runs the pod's own hook.
    let started = std::time::Instant::now();
    let output = std::process::Command::new(&installed)
        .args([
            "--proxies",
            "127.0.0.14:9",
            "--timeout",
            "400ms",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(started.elapsed() >= Duration::from_millis(400));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("timed out after") && stderr.contains("127.0.0.14:9: unreachable"),
        "{stderr}"
    );
    assert!(marker.exists(), "the pod's own preStop ran after the drain");
    std::fs::remove_dir_all(&dir).unwrap();
}
