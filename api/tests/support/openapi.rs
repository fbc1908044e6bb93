//! Offline checks of a CRD's OpenAPI v3 schema, standing in for what the API server does
//! when the CRD is created (structural-schema rules) and when an object is admitted
//! (type, range, enum, pattern and unknown-field checks, as `kubectl apply
//! --validate=strict` reports them). CEL rules are evaluated separately with `kube-cel`.
//!
//! Rules follow "Specifying a structural schema" in the Kubernetes CRD documentation.

use regex::Regex;
use serde_json::{Map, Value};

/// Keys that may not appear inside `allOf`/`anyOf`/`oneOf`/`not` of a structural schema.
const FORBIDDEN_IN_JUNCTORS: [&str; 5] = [
    "type",
    "description",
    "default",
    "additionalProperties",
    "nullable",
];
const JUNCTORS: [&str; 4] = ["allOf", "anyOf", "oneOf", "not"];

/// Every violation of the structural-schema rules in `schema`, as `path: problem`.
pub fn structural_violations(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check_node(schema, "", &mut out);
    out
}

fn check_node(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: schema node is not an object"));
        return;
    };
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(false)) {
        out.push(format!(
            "{path}: x-kubernetes-preserve-unknown-fields must be true or unset"
        ));
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("") | None if !(int_or_string || preserve) => out.push(format!(
            "{path}: no type (every node of a structural schema needs one)"
        )),
        Some(t) if int_or_string => out.push(format!(
            "{path}: type {t:?} together with x-kubernetes-int-or-string"
        )),
        Some("array") if !obj.contains_key("items") => {
            out.push(format!("{path}: array without items"))
        }
        Some(t) if !["object", "array", "string", "integer", "number", "boolean"].contains(&t) => {
            out.push(format!("{path}: unknown type {t:?}"))
        }
        _ => {}
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: properties and additionalProperties are mutually exclusive"
        ));
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        out.push(format!(
            "{path}: additionalProperties: false is not allowed"
        ));
    }
    if obj.contains_key("$ref") {
        out.push(format!("{path}: $ref is not allowed"));
    }
    for junctor in JUNCTORS {
        if let Some(sub) = obj.get(junctor) {
            let branches: Vec<&Value> = match sub {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for (i, branch) in branches.into_iter().enumerate() {
                check_junctor_branch(
                    branch,
                    obj,
                    &format!("{path}.{junctor}[{i}]"),
                    int_or_string,
                    out,
                );
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            check_node(child, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = obj.get("items") {
        check_node(items, &format!("{path}[]"), out);
    }
    if let Some(additional @ Value::Object(_)) = obj.get("additionalProperties") {
        check_node(additional, &format!("{path}.*"), out);
    }
}

/// Inside a junctor only value validations may appear, and every property they name must
/// also be specified outside it (the schema must be a "projection" of its junctors).
fn check_junctor_branch(
    branch: &Value,
    outer: &Map<String, Value>,
    path: &str,
    int_or_string: bool,
    out: &mut Vec<String>,
) {
    let Some(obj) = branch.as_object() else {
        return;
    };
    for key in FORBIDDEN_IN_JUNCTORS {
        // The one exception: int-or-string may spell out `anyOf: [{type: integer}, {type: string}]`.
        let allowed = key == "type" && int_or_string && obj.len() == 1;
        if obj.contains_key(key) && !allowed {
            out.push(format!(
                "{path}: {key:?} is not allowed inside allOf/anyOf/oneOf/not"
            ));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        let outer_props = outer.get("properties").and_then(Value::as_object);
        for name in props.keys() {
            if !outer_props.is_some_and(|p| p.contains_key(name)) {
                out.push(format!("{path}.{name}: not specified outside the junctor"));
            }
        }
    }
}

/// Every way `value` breaks `schema`, as `path: problem`. Unknown fields are reported
/// (strict field validation) unless the schema preserves them.
pub fn value_violations(schema: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check_value(schema, value, "", &mut out);
    out
}

fn check_value(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let Some(s) = schema.as_object() else { return };
    let flag = |key: &str| s.get(key) == Some(&Value::Bool(true));
    if value.is_null() {
        if !flag("nullable") {
            out.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    // The API server types an int-or-string node as ["integer", "string"]; the value
    // validations below then apply by the value's kind (minimum to integers, pattern to
    // strings), as the API server's validators do.
    if flag("x-kubernetes-int-or-string")
        && !(value.is_i64() || value.is_u64() || value.is_string())
    {
        out.push(format!("{path}: must be an integer or a string"));
        return;
    }
    let ty = s.get("type").and_then(Value::as_str).unwrap_or("");
    let type_ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        out.push(format!("{path}: expected {ty}, got {value}"));
        return;
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        out.push(format!(
            "{path}: {value} is not one of {}",
            Value::Array(allowed.clone())
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            out.push(format!("{path}: {n} is below the minimum {min}"));
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            out.push(format!("{path}: {n} is above the maximum {max}"));
        }
    }
    if let Some(text) = value.as_str() {
        let len = text.chars().count() as u64;
        if s.get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|min| len < min)
        {
            out.push(format!("{path}: {text:?} is shorter than minLength"));
        }
        if s.get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|max| len > max)
        {
            out.push(format!("{path}: {text:?} is longer than maxLength"));
        }
        if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
            match Regex::new(pattern) {
                Ok(re) if !re.is_match(text) => {
                    out.push(format!("{path}: {text:?} does not match {pattern}"))
                }
                Ok(_) => {}
                Err(e) => out.push(format!("{path}: invalid pattern {pattern}: {e}")),
            }
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|min| len < min)
        {
            out.push(format!("{path}: fewer than minItems items"));
        }
        if s.get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|max| len > max)
        {
            out.push(format!("{path}: more than maxItems items"));
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                check_value(item_schema, item, &format!("{path}[{i}]"), out);
            }
        }
    }
    if let Some(fields) = value.as_object() {
        for name in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = name.as_str()
                && !fields.contains_key(name)
            {
                out.push(format!("{path}.{name}: required field missing"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        let additional = s.get("additionalProperties");
        let preserve = flag("x-kubernetes-preserve-unknown-fields");
        for (name, field) in fields {
            let child = format!("{path}.{name}");
            match (props.and_then(|p| p.get(name)), additional) {
                // Object metadata is checked by the API server's own code, not the schema.
                (Some(_), _) if path.is_empty() && name == "metadata" => {}
                (Some(field_schema), _) => check_value(field_schema, field, &child, out),
                (None, Some(extra @ Value::Object(_))) => check_value(extra, field, &child, out),
                (None, Some(Value::Bool(true))) => {}
                // The API server knows `apiVersion`, `kind` and `metadata` on every object.
                (None, _)
                    if path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&name.as_str()) => {}
                (None, _) if preserve => {}
                (None, _) => out.push(format!("{child}: unknown field")),
            }
        }
    }
}
