//! The check that a dashboard and alert rules use only metrics that are exported:
//! the metric names in PromQL, the series names a text exposition offers, and the
//! queries of a Grafana dashboard and of a PrometheusRule.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The `ballast_*` metric names in a PromQL expression. Quoted strings (label values,
/// `label_replace` arguments) are skipped.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                unquoted.push(' ');
            }
            None => unquoted.push(c),
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("ballast_"))
        .map(str::to_owned)
        .collect()
}

/// The series names a text exposition (OpenMetrics or Prometheus) offers: each
/// family's sample names by its `# TYPE` (a counter `x` is queried as `x_total`, a
/// histogram as `x_bucket`, `x_sum`, `x_count`), and every sample line's name.
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// Every query of a Grafana dashboard, with where it is: panel targets' `expr` and the
/// template variables' queries, rows' nested panels included.
pub fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((format!("panel {title:?}"), expr.to_owned()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = variable["name"].as_str().unwrap_or("?");
        let query = &variable["query"];
        let query = query["query"].as_str().or_else(|| query.as_str());
        if variable["type"] == "query"
            && let Some(query) = query
        {
            out.push((format!("variable ${name}"), query.to_owned()));
        }
    }
    out
}

/// The rules of a PrometheusRule: (alert or record name, expr).
pub fn rule_queries(rule: &Value) -> Vec<(String, String)> {
    rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            (
                format!("rule {name}"),
                r["expr"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Each metric name the queries use that `exported` lacks, with where it is used.
pub fn unexported(queries: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    let mut missing = BTreeMap::<String, Vec<&str>>::new();
    for (place, expr) in queries {
        for name in metric_names(expr) {
            if !exported.contains(&name) {
                missing.entry(name).or_default().push(place);
            }
        }
    }
    missing
        .into_iter()
        .map(|(name, places)| format!("{name} (in {})", places.join(", ")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_check_finds_names_nobody_exports() {
        let exposition = "# HELP ballast_requests Requests.\n# TYPE ballast_requests counter\n\
            ballast_requests_total{pod=\"a\"} 3\n# TYPE ballast_seconds histogram\n\
            ballast_seconds_bucket{le=\"+Inf\"} 1\n# TYPE ballast_open gauge\n# EOF\n";
        let exported = exported_names(exposition);
        assert!(exported.contains("ballast_requests_total"));
        assert!(exported.contains("ballast_seconds_count"));
        assert!(exported.contains("ballast_open"), "a family with no series");
        assert!(
            !exported.contains("ballast_requests"),
            "a counter's series end in _total"
        );

        let queries = [
            (
                "panel a".to_owned(),
                r#"sum by (pod) (rate(ballast_requests_total{job="ballast_not_a_metric"}[5m]))
                   / histogram_quantile(0.9, rate(ballast_seconds_bucket[5m])) + ballast_open"#
                    .to_owned(),
            ),
            (
                "rule B".to_owned(),
                r#"ballast_made_up_total > 0 and label_replace(ballast_requests, "x", "$1", "pod", "ballast_(.*)")"#
                    .to_owned(),
            ),
        ];
        assert_eq!(
            unexported(&queries, &exported),
            [
                "ballast_made_up_total (in rule B)",
                "ballast_requests (in rule B)"
            ]
        );
        assert_eq!(
            metric_names(r#"max(ballast_a{x="ballast_b\"ballast_c"}) or ballast_d:ratio"#),
            BTreeSet::from(["ballast_a".to_owned(), "ballast_d:ratio".to_owned()])
        );
    }
}
