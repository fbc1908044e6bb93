//! The stand-in's write path, enough for a controller to run against it: create (POST),
//! replace (PUT, with the resourceVersion precondition), server-side apply, JSON merge
//! and strategic merge patches (PATCH), on an object or its `status` subresource, and
//! DELETE. Field ownership, defaulting and validation are left out: an apply merges its
//! fields over the stored object, which is what a single field manager observes.

use serde_json::{Map, Value, json};

use super::store::{ObjectKey, Store};
use super::{ResourceType, Verb};

/// What a write asked for, parsed from the request.
pub(super) struct Write<'a> {
    pub verb: Verb,
    pub resource: &'a ResourceType,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub status_only: bool,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// The answer: HTTP status and body.
pub(super) type Answer = (u16, Value);

fn failure(code: u16, reason: &str, message: &str) -> Answer {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Carries out `write` on `store`; the answer says what happened.
pub(super) fn write(store: &mut Store, write: &Write<'_>) -> Answer {
    let body: Value = if write.body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(write.body) {
            Ok(v) => v,
            Err(e) => return failure(400, "BadRequest", &format!("body is not JSON: {e}")),
        }
    };
    let namespace = write.namespace.unwrap_or_default().to_owned();
    let name = match (write.name, &body["metadata"]["name"]) {
        (Some(n), _) => n.to_owned(),
        (None, Value::String(n)) if write.verb == Verb::Create => n.clone(),
        _ => return failure(400, "BadRequest", "the object has no name"),
    };
    let key = ObjectKey {
        api_version: write.resource.api_version.clone(),
        plural: write.resource.plural.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let old = store.get(&key).cloned();
    let not_found = || {
        failure(
            404,
            "NotFound",
            &format!("{} {name:?} not found", write.resource.plural),
        )
    };
    let new = match write.verb {
        Verb::Delete => {
            return match store.delete(&key) {
                Some(_) => (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                ),
                None => not_found(),
            };
        }
        Verb::Create if old.is_some() => {
            return failure(409, "AlreadyExists", &format!("{name:?} already exists"));
        }
        Verb::Create => body,
        Verb::Update => {
            let Some(old) = &old else {
                return not_found();
            };
            let wanted = &body["metadata"]["resourceVersion"];
            if !wanted.is_null() && *wanted != old["metadata"]["resourceVersion"] {
                return failure(409, "Conflict", "the object has been modified");
            }
            if write.status_only {
                with_status(old, &body["status"])
            } else {
                keep_status(body, old)
            }
        }
        Verb::Patch => {
            let apply = write.content_type.starts_with("application/apply-patch");
            match (&old, write.status_only, apply) {
                (None, true, _) | (None, false, false) => return not_found(),
                (None, false, true) => body,
                (Some(old), true, _) => {
                    let status = merge(&old["status"], &body["status"], write.content_type);
                    with_status(old, &status)
                }
                (Some(old), false, _) => {
                    let mut patch = body;
                    if let Some(map) = patch.as_object_mut() {
                        map.remove("status");
                    }
                    merge(old, &patch, write.content_type)
                }
            }
        }
        _ => return failure(405, "MethodNotAllowed", "not a write"),
    };
    store_object(store, write.resource, &key, old.as_ref(), new)
}

/// Writes `new` in place of `old` with the metadata the API server keeps: name and
/// namespace from the path, apiVersion and kind, creationTimestamp, and a generation that
/// moves when the spec does.
fn store_object(
    store: &mut Store,
    resource: &ResourceType,
    key: &ObjectKey,
    old: Option<&Value>,
    mut new: Value,
) -> Answer {
    if !new.is_object() {
        return failure(400, "BadRequest", "the object is not a JSON object");
    }
    new["apiVersion"] = json!(resource.api_version);
    new["kind"] = json!(resource.kind);
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    new["metadata"]["name"] = json!(key.name);
    if !key.namespace.is_empty() {
        new["metadata"]["namespace"] = json!(key.namespace);
    }
    let generation = match old {
        None => 1,
        Some(old) => {
            let before = old["metadata"]["generation"].as_i64().unwrap_or(1);
            if old["spec"] == new["spec"] {
                before
            } else {
                before + 1
            }
        }
    };
    new["metadata"]["generation"] = json!(generation);
    new["metadata"]["creationTimestamp"] = old
        .map(|o| o["metadata"]["creationTimestamp"].clone())
        .filter(|t| !t.is_null())
        .unwrap_or_else(|| json!("2026-01-01T00:00:00Z"));
    // A write that changes nothing is a no-op, as on the API server: no new
    // resourceVersion and no watch event (an operator re-applying the same objects
    // must not wake itself up).
    if let Some(old) = old {
        let mut same = new.clone();
        same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        same["metadata"]["uid"] = old["metadata"]["uid"].clone();
        if same == *old {
            return (200, old.clone());
        }
    }
    match store.apply(new) {
        Ok(_) => (
            if old.is_some() { 200 } else { 201 },
            store.get(key).cloned().unwrap_or(Value::Null),
        ),
        Err(message) => failure(422, "Invalid", &message),
    }
}

fn with_status(old: &Value, status: &Value) -> Value {
    let mut new = old.clone();
    new["status"] = status.clone();
    new
}

fn keep_status(mut new: Value, old: &Value) -> Value {
    new["status"] = old["status"].clone();
    if new["status"].is_null()
        && let Some(map) = new.as_object_mut()
    {
        map.remove("status");
    }
    new
}

/// `patch` over `base` by the patch type: apply and strategic merge merge lists of
/// objects keyed by `type` or `name` (conditions, containers), JSON merge patch replaces
/// lists; `null` removes a field.
pub(super) fn merge(base: &Value, patch: &Value, content_type: &str) -> Value {
    let keyed_lists = !content_type.starts_with("application/merge-patch");
    merge_value(base, patch, keyed_lists)
}

fn merge_value(base: &Value, patch: &Value, keyed_lists: bool) -> Value {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            let mut out: Map<String, Value> = b.clone();
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let merged = merge_value(b.get(k).unwrap_or(&Value::Null), v, keyed_lists);
                    out.insert(k.clone(), merged);
                }
            }
            Value::Object(out)
        }
        (Value::Array(b), Value::Array(p)) if keyed_lists => {
            let key_of = |v: &Value| {
                ["type", "name"].iter().find_map(|k| {
                    v.get(*k)
                        .and_then(Value::as_str)
                        .map(|s| (*k, s.to_owned()))
                })
            };
            if !p.iter().all(|v| key_of(v).is_some()) {
                return patch.clone();
            }
            let mut out = b.clone();
            for item in p {
                match out.iter_mut().find(|o| key_of(o) == key_of(item)) {
                    Some(existing) => *existing = merge_value(existing, item, keyed_lists),
                    None => out.push(item.clone()),
                }
            }
            Value::Array(out)
        }
        (_, p) => p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strategic_patch_merges_conditions_by_type() {
        let base = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]}});
        let patch = json!({"status": {"conditions": [
            {"type": "ballast.dev/routable", "status": "True"}, {"type": "Ready", "status": "True"}]}});
        let merged = merge(&base, &patch, "application/strategic-merge-patch+json");
        assert_eq!(
            merged["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"},
                   {"type": "ballast.dev/routable", "status": "True"}])
        );
        let replaced = merge(&base, &patch, "application/merge-patch+json");
        assert_eq!(
            replaced["status"]["conditions"],
            patch["status"]["conditions"]
        );
        let removed = merge(
            &json!({"metadata": {"annotations": {"a": "1", "b": "2"}}}),
            &json!({"metadata": {"annotations": {"a": null}}}),
            "application/merge-patch+json",
        );
        assert_eq!(removed, json!({"metadata": {"annotations": {"b": "2"}}}));
    }
}
