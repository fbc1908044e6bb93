//! The side-by-side table of finished variants that the demo and the rollout test print.

use super::ScenarioReport;
use std::time::Duration;

/// The widest line [`table`] prints for up to 200 pods and 7-digit counts: it fits a
/// 120-column terminal.
pub const MAX_WIDTH: usize = 120;

/// The columns, in order; the first is left-aligned, the others right-aligned.
const HEADER: [&str; 10] = [
    "variant",
    "req/s",
    "failed",
    "ws broken",
    "ws forced",
    "balance",
    "rollout",
    "available",
    "preStop",
    "proxies",
];

/// What each column means, printed under the table (the demo's README section quotes it).
const LEGEND: &str = "\
req/s      requests sent per second of load (each variant ran as long as its rollouts took)
failed     requests answered 5xx or not at all, whole run (their kinds above)
ws broken  WebSocket sessions cut before their end
ws forced  the one endless session, cut when its pod went (with the drain gate: at the drain timeout)
balance    busiest pod's requests over the mean, steady load before/after the rollout (1.00: even)
rollout    from the new template until the last old pod stopped
available  from the new template until every new pod was available
preStop    the longest preStop hook (the drain gate, or the sleep)
proxies    the rollout of the proxies themselves
status     status.lastRollout as the operator writes it: pods drained/forced, failed requests";

/// The table of finished variants: one row each, then what each variant's status says,
/// the failures by kind, and the legend. No line is wider than [`MAX_WIDTH`].
pub fn table(reports: &[&ScenarioReport]) -> String {
    let rows: Vec<[String; 10]> = reports.iter().map(|r| row(r)).collect();
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|i| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .chain([HEADER[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![
        line(&HEADER.map(str::to_owned)),
        line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>()),
    ];
    out.extend(rows.iter().map(|row| line(row)));
    out.push(String::new());
    for r in reports {
        let Some(s) = &r.status else { continue };
        let failed = s.failed_requests.old_revision + s.failed_requests.new_revision;
        out.push(format!(
            "status     {}: {} pods drained, {} forced, {failed} failed requests",
            r.variant.label(),
            s.pods_drained,
            s.forced_terminations,
        ));
    }
    for r in reports.iter().filter(|r| !r.load.failures.is_empty()) {
        let kinds: Vec<String> = r
            .load
            .failures
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        out.push(format!(
            "failed     {}: {}",
            r.variant.label(),
            kinds.join(", ")
        ));
    }
    out.push(String::new());
    out.push(LEGEND.to_owned());
    out.join("\n")
}

fn row(r: &ScenarioReport) -> [String; 10] {
    let per_second = r.load.sent as f64 / r.load_time.as_secs_f64().max(0.001);
    [
        r.variant.label(),
        format!("{per_second:.1}"),
        r.load.failed.to_string(),
        r.load.ws_broken.to_string(),
        r.load.ws_long_closed.to_string(),
        format!("{}/{}", ratio(r.balance_before), ratio(r.balance_after)),
        seconds(r.rollout),
        seconds(r.rollout_available),
        seconds(r.longest_pre_stop),
        r.proxy_rollout.map_or_else(|| "-".to_owned(), seconds),
    ]
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"))
}

#[cfg(test)]
mod tests;
