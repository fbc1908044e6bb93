//! Query strings and selectors as the API server reads them: percent-decoded
//! parameters, label selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
//! `a notin (x,y)`) and the field selectors every resource supports
//! (`metadata.name`, `metadata.namespace`).

use serde_json::Value;
use std::collections::BTreeMap;

/// Decoded query parameters (the last value wins when a name repeats).
pub(super) fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` plus `fieldSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<(String, bool, String)>,
}

impl Selector {
    /// Parses both selectors.
    ///
    /// # Errors
    /// The API server's kind of message for a selector it cannot parse.
    pub(super) fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let mut selector = Self::default();
        for term in split_terms(labels.unwrap_or_default()) {
            selector.labels.push(parse_label_term(&term)?);
        }
        for term in fields.unwrap_or_default().split(',').map(str::trim) {
            if term.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!(
                    "field label not supported: {field:?} (this stand-in knows metadata.name and metadata.namespace)"
                ));
            }
            selector
                .fields
                .push((field.to_owned(), equal, value.to_owned()));
        }
        Ok(selector)
    }

    /// True when `object` satisfies every requirement.
    pub(super) fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let label = |key: &str| metadata["labels"][key].as_str();
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(field, equal, value)| {
                let key = field.trim_start_matches("metadata.");
                let actual = metadata[key].as_str().unwrap_or_default();
                (actual == value) == *equal
            })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(text: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0_i32;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_term(term: &str) -> Result<Requirement, String> {
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("invalid label selector: {term:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(Requirement::NotIn(k.trim().into(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(Requirement::In(k.trim().into(), set(rest)?));
    }
    if let Some(k) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(k.trim().into()));
    }
    if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
        return Err(format!("invalid label selector: {term:?}"));
    }
    Ok(Requirement::Exists(term.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_what_kube_encodes() {
        let params = query_params(Some(
            "labelSelector=kubernetes.io%2Fservice-name%3Dweb&limit=500&watch=true",
        ));
        assert_eq!(params["labelSelector"], "kubernetes.io/service-name=web");
        assert_eq!(params["limit"], "500");
        assert_eq!(params["watch"], "true");
    }

    #[test]
    fn label_and_field_selectors() {
        let pod = json!({"metadata": {"name": "web-1", "namespace": "shop",
            "labels": {"app": "web", "tier": "front"}}});
        let yes = [
            "app=web",
            "app==web,tier",
            "tier in (front, back)",
            "app,!gone",
            "app notin (db)",
            "app!=db",
        ];
        for s in yes {
            assert!(Selector::parse(Some(s), None).unwrap().matches(&pod), "{s}");
        }
        for s in ["app=db", "gone", "!app", "tier notin (front)"] {
            assert!(
                !Selector::parse(Some(s), None).unwrap().matches(&pod),
                "{s}"
            );
        }
        let by_name = Selector::parse(None, Some("metadata.name=web-1")).unwrap();
        assert!(by_name.matches(&pod));
        assert!(Selector::parse(None, Some("spec.nodeName=a")).is_err());
        assert!(Selector::parse(Some("app in web"), None).is_err());
    }
}
