//! The tree as text: a header with the conditions, one branch per revision with its
//! pods, the proxies, the last rollout and the last Events. Pure: the same tree and
//! width give the same text, which the snapshot tests compare.

use ballast_api::status::RolloutSummary;
use k8s_openapi::jiff::Timestamp;
use std::fmt::Write as _;

use crate::tree::{PodNode, PodState, ProxyNode, RevisionRole, Tree};

/// How the text is laid out.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Longest line; longer ones are cut with `…` (a terminal's width, or `None` for
    /// plain output, which is never cut).
    pub width: Option<usize>,
}

/// The whole view.
pub fn tree(tree: &Tree, layout: Layout) -> String {
    let mut out = String::new();
    header(&mut out, tree);
    branches(&mut out, tree);
    if let Some(rollout) = &tree.rollout {
        rollout_line(&mut out, rollout, tree.at);
    }
    events(&mut out, tree);
    legend(&mut out);
    match layout.width {
        Some(width) => out.lines().map(|l| cut(l, width) + "\n").collect(),
        None => out,
    }
}

fn header(out: &mut String, tree: &Tree) {
    let revision = match (&tree.current_revision, &tree.update_revision) {
        (Some(current), Some(update)) if current != update => format!("{current} → {update}"),
        (_, Some(update)) => update.clone(),
        (Some(current), None) => current.clone(),
        (None, None) => "-".to_owned(),
    };
    let _ = write!(
        out,
        "BalancedService {}   {}   revision {}",
        tree.name, tree.phase, revision
    );
    if let Some(balance) = &tree.balance {
        let _ = write!(out, "   balance {balance}");
    }
    out.push('\n');
    if tree.stale {
        out.push_str("  (the operator has not yet acted on the latest spec)\n");
    }
    let rows: Vec<[String; 4]> = tree
        .conditions
        .iter()
        .map(|c| {
            [
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
            ]
        })
        .collect();
    table(out, "  ", &rows);
}

fn branches(out: &mut String, tree: &Tree) {
    let total = tree.revisions.len() + 1;
    // One set of column widths for the pods of every revision: they read as one table.
    let rows: Vec<Vec<[String; 5]>> = tree
        .revisions
        .iter()
        .map(|r| {
            r.pods
                .iter()
                .enumerate()
                .map(|(j, pod)| pod_row(pod, j + 1 == r.pods.len(), tree.at))
                .collect()
        })
        .collect();
    let widths = widths(rows.iter().flatten());
    for (i, (revision, rows)) in tree.revisions.iter().zip(&rows).enumerate() {
        let last = i + 1 == total;
        let ready = revision
            .pods
            .iter()
            .filter(|p| p.state == PodState::Ready)
            .count();
        let role = match revision.role {
            RevisionRole::New => " (new)",
            RevisionRole::Stable => " (stable)",
            RevisionRole::Old => "",
        };
        let _ = write!(
            out,
            "{} revision {}{role}   {ready}/{} ready",
            if last { "└─" } else { "├─" },
            revision.revision,
            revision.desired,
        );
        if let Some(rs) = &revision.replica_set {
            let _ = write!(out, "   ReplicaSet {rs}");
        }
        out.push('\n');
        lines(out, if last { "   " } else { "│  " }, rows, &widths);
    }
    proxies(out, &tree.proxies);
}

fn pod_row(pod: &PodNode, last: bool, now: Timestamp) -> [String; 5] {
    let mut name = format!("{} {}", if last { "└─" } else { "├─" }, pod.name);
    if pod.restarts > 0 {
        let _ = write!(name, " ({} restarts)", pod.restarts);
    }
    [
        name,
        pod.ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        pod.share
            .map(|s| format!("{:>3.0}%", s * 100.0))
            .unwrap_or_default(),
        pod.created.map(|c| ago(c, now)).unwrap_or_default(),
        state(&pod.state, now),
    ]
}

/// A pod's state for a person.
pub fn state(state: &PodState, now: Timestamp) -> String {
    match state {
        PodState::Starting => "starting".to_owned(),
        PodState::WaitingForGate { proxies, message } => match (proxies.as_slice(), message) {
            ([], Some(message)) => format!("waiting for the gate: {message}"),
            ([], None) => "waiting for the operator to open the gate".to_owned(),
            (missing, _) => format!(
                "waiting for the gate: not yet listed by {}",
                missing.join(", ")
            ),
        },
        PodState::Ready => "ready".to_owned(),
        PodState::NotReady => "not ready (readiness fails)".to_owned(),
        PodState::Draining {
            in_flight,
            connections,
            since,
            forced,
        } => {
            let after = since
                .map(|s| format!(" {}", ago(s, now)))
                .unwrap_or_default();
            match forced {
                // The drain helper gave up: the pod stops with this still open.
                Some(f) => format!(
                    "DRAIN TIMED OUT{after}: {} in flight, {} connection{} left",
                    f.in_flight,
                    f.connections,
                    if f.connections == 1 { "" } else { "s" }
                ),
                None => format!(
                    "draining{after}: {in_flight} in flight, {connections} connection{}",
                    if *connections == 1 { "" } else { "s" }
                ),
            }
        }
        PodState::Drained { after_ms, forced } => match (forced, after_ms) {
            (Some(f), _) => format!(
                "stopping, DRAIN TIMED OUT: {} in flight, {} connections were left",
                f.in_flight, f.connections
            ),
            (None, Some(ms)) => format!("drained in {}, stopping", millis(*ms)),
            (None, None) => "drained, stopping".to_owned(),
        },
        PodState::Stopped { phase } => format!("stopped ({phase})"),
    }
}

fn proxies(out: &mut String, proxies: &[ProxyNode]) {
    let ready = proxies.iter().filter(|p| p.ready && !p.terminating).count();
    let _ = writeln!(out, "└─ proxies   {ready}/{} ready", proxies.len());
    let rows: Vec<[String; 4]> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let branch = if i + 1 == proxies.len() {
                "└─"
            } else {
                "├─"
            };
            let readiness = match (p.terminating, p.ready) {
                (true, _) => "terminating",
                (false, true) => "ready",
                (false, false) => "not ready",
            };
            let report = match &p.report {
                Ok(c) => format!(
                    "{} endpoints, {} draining, {} in flight",
                    c.listed, c.draining, c.in_flight
                ),
                Err(e) => format!("admin not read: {e}"),
            };
            [
                format!("{branch} {}", p.name),
                readiness.to_owned(),
                report,
                String::new(),
            ]
        })
        .collect();
    table(out, "   ", &rows);
}

fn rollout_line(out: &mut String, r: &RolloutSummary, now: Timestamp) {
    let from = r.previous_revision.as_deref().unwrap_or("-");
    let _ = write!(out, "\nLast rollout   {from} → {}   ", r.revision);
    match &r.finished_at {
        Some(done) => {
            let _ = write!(
                out,
                "finished {} ago after {}",
                ago(done.0, now),
                seconds(r.duration_seconds)
            );
        }
        None => {
            let _ = write!(out, "running for {}", ago(r.started_at.0, now));
        }
    }
    out.push('\n');
    let failed = r.failed_requests.old_revision + r.failed_requests.new_revision;
    let sent = r.requests.old_revision + r.requests.new_revision;
    let _ = writeln!(
        out,
        "  drains {} (longest {}, {} timed out)   requests {} old / {} new   failed {} old / {} new{}",
        r.pods_drained,
        millis(u64::try_from(r.longest_drain_millis).unwrap_or_default()),
        r.forced_terminations,
        r.requests.old_revision,
        r.requests.new_revision,
        r.failed_requests.old_revision,
        r.failed_requests.new_revision,
        if sent > 0 {
            format!(" ({:.2}%)", failed as f64 * 100.0 / sent as f64)
        } else {
            String::new()
        }
    );
    if let Some(p) = &r.paused {
        let what = match (p.resumed, p.rolled_back) {
            (true, _) => "resumed after a pause",
            (false, true) => "ROLLED BACK",
            (false, false) => "PAUSED",
        };
        let _ = writeln!(out, "  {what} {} ago: {}", ago(p.at.0, now), p.reason);
    }
}

fn events(out: &mut String, tree: &Tree) {
    if tree.events.is_empty() {
        return;
    }
    out.push_str("\nEvents\n");
    let rows: Vec<[String; 4]> = tree
        .events
        .iter()
        .map(|e| {
            let mut age = e.at.map_or_else(|| "-".to_owned(), |at| ago(at, tree.at));
            if e.count > 1 {
                let _ = write!(age, " (x{})", e.count);
            }
            [age, e.type_.clone(), e.reason.clone(), e.message.clone()]
        })
        .collect();
    table(out, "  ", &rows);
}

fn legend(out: &mut String) {
    out.push_str(
        "\npods: name, IP, share of requests since the previous look, age, state \
         (in flight and connections summed over the proxies)\n",
    );
}

/// Rows as left-aligned columns two spaces apart (trailing blanks dropped).
pub(crate) fn table<const N: usize>(out: &mut String, indent: &str, rows: &[[String; N]]) {
    lines(out, indent, rows, &widths(rows));
}

/// The widest cell of each column.
fn widths<'a, const N: usize>(rows: impl IntoIterator<Item = &'a [String; N]>) -> [usize; N] {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// `rows` padded to `widths`.
fn lines<const N: usize>(
    out: &mut String,
    indent: &str,
    rows: &[[String; N]],
    widths: &[usize; N],
) {
    for row in rows {
        let mut line = indent.to_owned();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i] - cell.chars().count();
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `line` at most `width` characters, `…` marking a cut.
fn cut(line: &str, width: usize) -> String {
    if line.chars().count() <= width || width == 0 {
        return line.to_owned();
    }
    let mut short: String = line.chars().take(width - 1).collect();
    short.push('…');
    short
}

/// Time since `then`, as kubectl prints ages: `45s`, `3m12s`, `2h5m`, `3d4h`.
pub fn ago(then: Timestamp, now: Timestamp) -> String {
    seconds(now.as_second() - then.as_second())
}

/// A duration in whole seconds, as kubectl prints ages.
pub fn seconds(total: i64) -> String {
    let s = total.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Milliseconds for a person: `850ms`, `1.2s`, `2m05s`.
pub fn millis(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => seconds(i64::try_from(ms / 1000).unwrap_or(i64::MAX)),
    }
}
