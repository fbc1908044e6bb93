//! Harness for cross-process tests: processes on distinct loopback addresses stand in
//! for pods. It is a test harness, never presented as Kubernetes.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child process that is killed (by PID) and reaped when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `program` with `args`; stdout lines are collected for [`Process::wait_for`],
    /// stderr is inherited (test output shows it on failure).
    ///
    /// # Panics
    /// When the program cannot be started.
    pub fn spawn(program: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(program, args, &[])
    }

    /// [`Process::spawn`] with extra environment variables.
    ///
    /// # Panics
    /// When the program cannot be started.
    pub fn spawn_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self { child, lines }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    ///
    /// # Panics
    /// When no such line arrives within `limit`.
    pub fn wait_for(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!("no line starting with {prefix:?} within {limit:?}"),
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    ///
    /// # Panics
    /// When the signal cannot be sent.
    pub fn sigterm(&self) {
        if let Err(e) = sigterm(self.pid()) {
            panic!("SIGTERM to {}: {e}", self.pid());
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to process `pid` (the std library only has SIGKILL).
///
/// # Errors
/// When the signal cannot be sent (no such process, a pid out of range).
pub fn sigterm(pid: u32) -> Result<(), String> {
    let pid = i32::try_from(pid).map_err(|e| format!("pid {pid}: {e}"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| e.to_string())
}

/// A port that was free on `ip` a moment ago.
///
/// # Panics
/// When no port can be bound.
pub fn free_port(ip: [u8; 4]) -> u16 {
    TcpListener::bind(SocketAddr::from((ip, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Directory of the workspace binaries next to the running executable
/// (`target/<profile>`, also from a test binary in `target/<profile>/deps`).
pub fn workspace_bin_dir() -> std::path::PathBuf {
    let mut dir = std::env::current_exe().unwrap_or_default();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary built next to the test binaries (`target/<profile>/NAME`).
pub fn workspace_bin(name: &str) -> String {
    workspace_bin_dir()
        .join(name)
        .to_string_lossy()
        .into_owned()
}

pub mod adoption;
pub mod apiserver;
pub mod cluster;
pub mod failing_release;
pub mod l4;
pub mod load;
pub mod monitoring;
pub mod scenario;
pub mod slices;

/// Locks `m`, taking the data of a poisoned lock as it is (a panicked test thread has
/// already failed its test).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
