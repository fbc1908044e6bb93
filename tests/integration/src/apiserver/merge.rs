//! Server-side apply's merge, as the API server does it when one field manager applies a
//! partial object onto what another manager wrote: objects and maps merge key by key,
//! the pod spec's keyed lists merge item by item (containers, init containers, volumes
//! and env by `name`, volume mounts by `mountPath`, container ports by
//! `containerPort`), every other list is replaced whole (atomic, as `readinessGates`).
//! Enough for the Deployments the stand-in acts out; ownership and conflicts are not
//! modelled (ballast applies with force).

use serde_json::Value;

/// The merge key of the list under `field`, if it is a keyed list.
fn list_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// `applied` merged onto `live`.
pub fn merge(live: &Value, applied: &Value) -> Value {
    merge_field(None, live, applied)
}

fn merge_field(field: Option<&str>, live: &Value, applied: &Value) -> Value {
    match (live, applied) {
        (Value::Object(live), Value::Object(applied)) => {
            let mut out = live.clone();
            for (key, value) in applied {
                let merged = match live.get(key) {
                    Some(before) => merge_field(Some(key), before, value),
                    None => value.clone(),
                };
                out.insert(key.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(live), Value::Array(applied)) => match field.and_then(list_key) {
            Some(key) => {
                let mut out = live.clone();
                for item in applied {
                    match out.iter_mut().find(|i| i.get(key) == item.get(key)) {
                        Some(existing) => *existing = merge_field(None, existing, item),
                        None => out.push(item.clone()),
                    }
                }
                Value::Array(out)
            }
            None => Value::Array(applied.clone()),
        },
        _ => applied.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_partial_container_merges_into_the_owners_by_name() {
        let live = json!({"spec": {"replicas": 3, "template": {"spec": {
            "containers": [{"name": "app", "image": "web:1", "ports": [{"containerPort": 8080}]},
                           {"name": "sidecar", "image": "s:1"}],
            "readinessGates": [{"conditionType": "theirs"}],
        }}}});
        let applied = json!({"spec": {"template": {"spec": {
            "containers": [{"name": "app", "lifecycle": {"preStop": {"exec": {"command": ["drain"]}}},
                            "volumeMounts": [{"name": "bin", "mountPath": "/b"}]}],
            "initContainers": [{"name": "install", "image": "ballast"}],
            "readinessGates": [{"conditionType": "theirs"}, {"conditionType": "ours"}],
        }}}});
        let merged = merge(&live, &applied);
        let pod = &merged["spec"]["template"]["spec"];
        assert_eq!(merged["spec"]["replicas"], 3, "what is not applied stays");
        assert_eq!(pod["containers"][0]["image"], "web:1");
        assert_eq!(
            pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][0],
            "drain"
        );
        assert_eq!(pod["containers"][1]["name"], "sidecar");
        assert_eq!(pod["initContainers"][0]["name"], "install");
        assert_eq!(pod["readinessGates"].as_array().unwrap().len(), 2);
    }
}
