//! Endpoints from a file: a list of entries, or `{endpoints: [...]}`, in JSON or YAML.
//!
//! The file is polled (cheap: one `stat` per interval) rather than watched with inotify,
//! because Kubernetes updates mounted ConfigMaps by swapping a symlink, which inotify
//! watches on the file miss.

use crate::endpoint::{Endpoint, EndpointSet};
use serde::Deserialize;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

#[derive(Deserialize)]
#[serde(untagged)]
enum EndpointsFile {
    List(Vec<Endpoint>),
    Document { endpoints: Vec<Endpoint> },
}

/// Parses an endpoints file's text (JSON is YAML too).
///
/// # Errors
/// The parser's message when the text is not a valid endpoints file.
pub fn parse_endpoints(text: &str) -> Result<EndpointSet, String> {
    if text.trim().is_empty() {
        return Ok(EndpointSet::default());
    }
    match serde_norway::from_str::<EndpointsFile>(text) {
        Ok(EndpointsFile::List(list) | EndpointsFile::Document { endpoints: list }) => {
            Ok(EndpointSet::new(list))
        }
        // The untagged enum hides the useful message; parse as the list to surface it.
        Err(_) => match serde_norway::from_str::<Vec<Endpoint>>(text) {
            Ok(list) => Ok(EndpointSet::new(list)),
            Err(e) => Err(e.to_string()),
        },
    }
}

pub(super) async fn watch(path: &Path, interval: Duration, tx: watch::Sender<EndpointSet>) {
    let mut seen: Option<(SystemTime, u64)> = None;
    let mut loaded = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = tx.closed() => return,
        }
        let stamp = match tokio::fs::metadata(path).await {
            Ok(meta) => (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            ),
            Err(e) => {
                if seen.is_some() || tx.borrow().is_empty() {
                    tracing::warn!(path = %path.display(), error = %e, "endpoints file unreadable; keeping the last endpoints");
                }
                seen = None;
                continue;
            }
        };
        if seen == Some(stamp) {
            continue;
        }
        match tokio::fs::read_to_string(path)
            .await
            .map_err(|e| e.to_string())
            .and_then(|t| parse_endpoints(&t))
        {
            Ok(set) => {
                seen = Some(stamp);
                tracing::info!(path = %path.display(), endpoints = set.len(), "endpoints file loaded");
                // The first load is always published, even when empty: it is what
                // makes the proxy ready.
                let first = !loaded;
                loaded = true;
                tx.send_if_modified(|current| {
                    let changed = first || *current != set;
                    *current = set;
                    changed
                });
            }
            // A half-written file must not empty the set: keep the last good one and
            // look again next tick (the stamp is not recorded).
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "endpoints file invalid; keeping the last endpoints")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_and_document_forms() {
        let list = parse_endpoints(r#"[{"address": "127.0.0.2:80", "name": "a"}]"#).unwrap();
        assert_eq!(list.len(), 1);
        let doc = parse_endpoints(
            "endpoints:\n  - address: 127.0.0.2:80\n    ready: false\n    terminating: true\n",
        )
        .unwrap();
        let e = doc.iter().next().unwrap();
        assert!(!e.ready && e.serving && e.terminating);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_addresses() {
        assert!(parse_endpoints(r#"[{"address": "127.0.0.2:80", "redy": true}]"#).is_err());
        assert!(parse_endpoints(r#"[{"address": "not-an-address"}]"#).is_err());
    }

    #[tokio::test]
    async fn file_changes_are_published_and_bad_writes_keep_the_last_set() {
        let dir = std::env::temp_dir().join(format!("ballast-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("endpoints.yaml");
        // As a writer that others read must (and as Kubernetes swaps a ConfigMap's
        // files): the whole new text at once. A plain write truncates first, and a poll
        // between the truncation and the write reads an empty file, which is an empty
        // set: that made this test flaky.
        let write = |text: &str| {
            let next = dir.join("endpoints.yaml.next");
            std::fs::write(&next, text).unwrap();
            std::fs::rename(&next, &path).unwrap();
        };
        write("- address: 127.0.0.2:80\n");
        let (tx, mut rx) = watch::channel(EndpointSet::default());
        let task = tokio::spawn({
            let path = path.clone();
            async move { watch(&path, Duration::from_millis(10), tx).await }
        });
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().len(), 1);

        write("- address: [broken\n");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            rx.borrow().len(),
            1,
            "an invalid write keeps the last good set"
        );

        write("- address: 127.0.0.2:80\n- address: 127.0.0.3:80\n");
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|set| set.len() == 2))
            .await
            .expect("the new set is published")
            .unwrap();
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
