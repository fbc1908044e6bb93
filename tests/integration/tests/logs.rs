//! What the binaries that run in a cluster write to their logs: with `--log-format json`
//! (or `BALLAST_LOG_FORMAT=json`) one JSON object per line and nothing else, so a
//! cluster's log pipeline parses every line; as text into a pipe or a file, no colour
//! escape codes.

use ballast_integration::{free_port, sigterm, workspace_bin};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(20);

/// A workspace binary built next to the tests (another package's binaries are built
/// by `cargo test --workspace`).
fn bin(name: &str) -> String {
    let path = workspace_bin(name);
    assert!(
        std::path::Path::new(&path).exists(),
        "build it first: cargo build --workspace --bins ({path})"
    );
    path
}

/// What a process wrote before it ended.
struct Written {
    stdout: String,
    stderr: String,
}

/// Starts `program` with stdout and stderr going to pipes (neither is a terminal) and
/// `RUST_LOG=info`.
fn start(program: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(program)
        .args(args)
        .env_remove("BALLAST_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

/// Sends SIGTERM unless it has exited already, waits (bounded) for the exit, killing it
/// past the limit, and returns what it wrote.
fn stop(mut child: Child) -> Written {
    if child.try_wait().ok().flatten().is_none() {
        let _ = sigterm(child.id());
    }
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "process {} did not exit within {LIMIT:?} of SIGTERM",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut written = Written {
        stdout: String::new(),
        stderr: String::new(),
    };
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut written.stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut written.stderr);
    }
    written
}

/// Every line parsed as a tracing JSON object (`timestamp`, `level`, `fields`).
fn json_lines(who: &str, text: &str) -> Vec<serde_json::Value> {
    assert!(!text.trim().is_empty(), "{who} logged nothing");
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: a line that is not JSON ({e}): {line:?}"));
            for key in ["timestamp", "level", "fields"] {
                assert!(value.get(key).is_some(), "{who}: no {key:?} in {line}");
            }
            value
        })
        .collect()
}

fn message<'a>(lines: &'a [serde_json::Value], text: &str) -> Option<&'a serde_json::Value> {
    lines.iter().find(|l| l["fields"]["message"] == text)
}

/// GET `path` on `addr` once it accepts connections (bounded); the status line.
fn get(addr: SocketAddr, path: &str) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut answer).is_ok()
                && !answer.is_empty()
            {
                return answer.lines().next().unwrap_or_default().to_owned();
            }
        }
        assert!(Instant::now() < deadline, "{addr} never answered {path}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The proxy's `/ready` once it says 200 (bounded).
fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + LIMIT;
    while !get(admin, "/ready").contains(" 200 ") {
        assert!(
            Instant::now() < deadline,
            "proxy at {admin} never became ready"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A sample app on 127.0.0.1 with `extra` flags, answering already.
fn sample_app(extra: &[&str]) -> (Child, SocketAddr) {
    let addr = local(free_port([127, 0, 0, 1]));
    let listen = addr.to_string();
    let mut args = vec!["--listen", &listen];
    args.extend_from_slice(extra);
    let app = start(&bin("ballast-sample-app"), &args, &[]);
    assert!(get(addr, "/").contains(" 200 "));
    (app, addr)
}

/// A proxy balancing over `endpoint`, ready, with `env`.
fn proxy(endpoint: SocketAddr, env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let (listen, admin) = (
        local(free_port([127, 0, 0, 1])),
        local(free_port([127, 0, 0, 1])),
    );
    let proxy = start(
        &bin("ballast-proxy"),
        &[
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--endpoints",
            &endpoint.to_string(),
            "--shutdown-delay",
            "0",
        ],
        env,
    );
    wait_ready(admin);
    (proxy, listen)
}

/// `ballast-operator run` with no cluster to reach: it logs why and exits.
fn operator_without_cluster(extra: &[&str]) -> Written {
    let admin = local(free_port([127, 0, 0, 1])).to_string();
    let mut args = vec!["run", "--admin-listen", &admin];
    args.extend_from_slice(extra);
    let missing = std::env::temp_dir().join(format!(
        "ballast-no-kubeconfig-{}/config",
        std::process::id()
    ));
    let mut operator = Command::new(bin("ballast-operator"))
        .args(&args)
        .env_remove("BALLAST_LOG_FORMAT")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", &missing)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the operator starts");
    let deadline = Instant::now() + LIMIT;
    while operator.try_wait().ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "the operator did not give up without a cluster"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(operator)
}

#[test]
fn logs_with_log_format_json_are_one_json_object_per_line_and_nothing_else() {
    let (app, app_addr) = sample_app(&["--log-format", "json"]);
    // The environment variable works as the flag does (what a manifest may set).
    let (proxy, listen) = proxy(app_addr, &[("BALLAST_LOG_FORMAT", "json")]);
    assert!(get(listen, "/").contains(" 200 "));
    let proxy = stop(proxy);
    let app = stop(app);

    assert_eq!(app.stdout, "", "the sample app wrote to stdout");
    let app_lines = json_lines("ballast-sample-app", &app.stderr);
    let listening = message(&app_lines, "listening").expect("a listening line");
    assert_eq!(listening["fields"]["addr"], app_addr.to_string());

    assert_eq!(proxy.stdout, "", "the proxy wrote to stdout");
    let proxy_lines = json_lines("ballast-proxy", &proxy.stderr);
    assert!(
        message(&proxy_lines, "ballast-proxy listening").is_some(),
        "{}",
        proxy.stderr
    );

    let operator = operator_without_cluster(&["--log-format", "json"]);
    assert_eq!(operator.stdout, "", "the operator wrote to stdout");
    let operator_lines = json_lines("ballast-operator", &operator.stderr);
    let error = message(&operator_lines, "cannot configure the Kubernetes client")
        .unwrap_or_else(|| panic!("no error line: {}", operator.stderr));
    assert_eq!(error["level"], "ERROR");
}

#[test]
fn text_logs_into_a_pipe_have_no_colour_codes() {
    let (app, app_addr) = sample_app(&[]);
    let (proxy, listen) = proxy(app_addr, &[]);
    assert!(get(listen, "/").contains(" 200 "));
    let proxy = stop(proxy);
    let app = stop(app);
    let operator = operator_without_cluster(&[]);
    for (who, text) in [
        ("ballast-sample-app", &app.stderr),
        ("ballast-proxy", &proxy.stderr),
        ("ballast-operator", &operator.stderr),
    ] {
        assert!(
            text.contains("INFO") || text.contains("ERROR"),
            "{who}: {text}"
        );
        assert!(!text.contains('\x1b'), "{who} wrote escape codes: {text:?}");
    }
    assert_eq!(app.stdout.trim(), format!("listening on {app_addr}"));
}
