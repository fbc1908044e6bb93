//! What every ballast binary does at its edges, written once: how it logs, which
//! signals stop it, and how an error reads on one line.
#![forbid(unsafe_code)]

use ballast_api::settings::LogFormat;
use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): JSON lines, or text with
/// colour only when stderr is a terminal (a file or a pipe gets no escape codes).
///
/// Does nothing when a logger is already installed (a test that starts two binaries'
/// code in one process).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _already = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Resolves on the first SIGTERM (what the kubelet sends) or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first
/// polled, so a signal that arrives in between is not lost (nor does it kill the
/// process). Must be called inside a Tokio runtime. A handler that cannot be installed
/// leaves the other one; with neither, the future never resolves and the signal's
/// default action stops the process.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            _ = received(term.as_mut()) => {}
            _ = received(int.as_mut()) => {}
        }
    }
}

async fn received(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// An error and its causes on one line, `outer: cause: root cause`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source in their own text; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn causes_follow_on_one_line_once_each() {
        let root = Layer("connection refused", None);
        assert_eq!(error_chain(&root), "connection refused");
        let chain = Layer(
            "connecting to 10.0.0.7:8080",
            Some(Box::new(Layer(
                "tcp connect",
                Some(Box::new(Layer("connection refused", None))),
            ))),
        );
        assert_eq!(
            error_chain(&chain),
            "connecting to 10.0.0.7:8080: tcp connect: connection refused"
        );
        let repeating = Layer(
            "connect failed: connection refused",
            Some(Box::new(Layer("connection refused", None))),
        );
        assert_eq!(
            error_chain(&repeating),
            "connect failed: connection refused"
        );
    }
}
