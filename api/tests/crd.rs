//! The generated CRD: committed copy up to date, structural, samples valid, and every CEL
//! rule proven to accept a good object and reject a bad one — all without an API server.

mod support;

use ballast_api::BalancedService;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use support::openapi::{structural_violations, value_violations};

const CRD_FILE: &str = "crds/balancedservices.ballast.dev.yaml";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn crd_json() -> Value {
    serde_json::to_value(ballast_api::crd()).expect("CRD serializes")
}

fn openapi_schema() -> Value {
    crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The HTTP sample: the BalancedService the rule and schema cases start from (a
/// template, not a workloadRef; `samples()` comes in directory order).
fn template_sample() -> Value {
    samples()
        .into_iter()
        .find(|(file, _)| file == "demo-http.yaml")
        .map(|(_, sample)| sample)
        .expect("config/samples/demo-http.yaml")
}

fn samples() -> Vec<(String, Value)> {
    let dir = repo_root().join("config/samples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("config/samples exists") {
        let path = entry.expect("readable dir entry").path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("sample readable");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("sample is YAML");
            if value["kind"] == "BalancedService" {
                out.push((name.clone(), value));
            }
        }
    }
    assert!(
        out.len() >= 2,
        "expected the HTTP and the gRPC sample, found {}",
        out.len()
    );
    out
}

/// Schema, CEL and serde checks, as the API server and then the operator would apply
/// them. Returns every problem found.
fn admission_problems(object: &Value) -> Vec<String> {
    let schema = openapi_schema();
    let defaulted = kube_cel::apply_defaults(&schema, object);
    let mut problems = value_violations(&schema, &defaulted);
    if let Err(errors) = kube_cel::validate(&schema, &defaulted, None) {
        problems.extend(
            errors
                .iter()
                .map(|e| format!("CEL {}: {}", e.field_path, e.message)),
        );
    }
    if problems.is_empty()
        && let Err(e) = serde_json::from_value::<BalancedService>(defaulted)
    {
        problems.push(format!("operator cannot read it: {e}"));
    }
    problems
}

fn cel_failures(object: &Value) -> Vec<String> {
    let schema = openapi_schema();
    let defaulted = kube_cel::apply_defaults(&schema, object);
    match kube_cel::validate(&schema, &defaulted, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.rule.clone()).collect(),
    }
}

#[test]
fn committed_crd_matches_the_types() {
    let generated = ballast_api::crd_yaml().expect("CRD renders as YAML");
    let committed = std::fs::read_to_string(repo_root().join(CRD_FILE)).unwrap_or_default();
    assert!(
        committed == generated,
        "{CRD_FILE} is out of date; regenerate it with\n  \
         cargo run -p ballast-operator -- crd > {CRD_FILE}"
    );
}

#[test]
fn crd_names_subresources_and_columns() {
    let crd = crd_json();
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "ballast.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["shortNames"], json!(["bsvc"]));
    assert_eq!(spec["names"]["categories"], json!(["ballast"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    assert_eq!(
        version["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    assert_eq!(
        version["subresources"]["scale"]["labelSelectorPath"],
        ".status.selector"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Up-To-Date", "Revision", "Balance", "Phase", "Age"]
    );
}

#[test]
fn crd_schema_is_structural() {
    let violations = structural_violations(&openapi_schema());
    assert!(
        violations.is_empty(),
        "not structural:\n{}",
        violations.join("\n")
    );
}

#[test]
fn structural_check_catches_a_typeless_property() {
    let mut schema = openapi_schema();
    schema["properties"]["spec"]["properties"]["sneaky"] = json!({"description": "no type"});
    let violations = structural_violations(&schema);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].starts_with(".spec.sneaky: no type"),
        "{violations:?}"
    );
}

#[test]
fn structural_check_catches_junctor_misuse_and_bad_int_or_string() {
    let mut schema = openapi_schema();
    let props = &mut schema["properties"]["spec"]["properties"];
    props["replicas"]["anyOf"] = json!([{"type": "integer", "default": 3}]);
    props["ports"]["items"]["properties"]["targetPort"]["type"] = json!("string");
    props["proxy"]["x-kubernetes-preserve-unknown-fields"] = json!(false);
    let violations = structural_violations(&schema);
    let expected = [
        ".spec.replicas.anyOf[0]: \"type\" is not allowed",
        ".spec.replicas.anyOf[0]: \"default\" is not allowed",
        ".spec.ports[].targetPort: type \"string\" together with x-kubernetes-int-or-string",
        ".spec.proxy: x-kubernetes-preserve-unknown-fields must be true or unset",
    ];
    for want in expected {
        assert!(
            violations.iter().any(|v| v.starts_with(want)),
            "missing {want:?} in {violations:?}"
        );
    }
}

#[test]
fn samples_validate_against_the_crd() {
    for (file, sample) in samples() {
        let problems = admission_problems(&sample);
        assert!(problems.is_empty(), "{file}: {}", problems.join("\n"));
    }
}

#[test]
fn schema_check_rejects_what_the_api_server_would() {
    let base = template_sample();
    let cases = [
        (
            "/spec/replicas",
            json!(-1),
            ".spec.replicas: -1 is below the minimum",
        ),
        (
            "/spec/replicas",
            json!("two"),
            ".spec.replicas: expected integer",
        ),
        (
            "/spec/balancing/algorithm",
            json!("random"),
            ".spec.balancing.algorithm: \"random\" is not one of",
        ),
        (
            "/spec/ports/0/name",
            json!("HTTP"),
            ".spec.ports[0].name: \"HTTP\" does not match",
        ),
        (
            "/spec/rollout/drainTimeoutSecs",
            json!(5),
            ".spec.rollout.drainTimeoutSecs: unknown field",
        ),
        ("/spec/ports", json!([]), ".spec.ports: fewer than minItems"),
    ];
    for (pointer, value, want) in cases {
        let mut object = base.clone();
        set(&mut object, pointer, value);
        let problems = admission_problems(&object);
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "{pointer}: want {want:?}, got {problems:?}"
        );
    }
}

/// The int-or-string fields are checked by OpenAPI value validations (CEL string
/// functions on them would cost millions each, see `cel_budget.rs`): `minimum`/`maximum`
/// apply to integers, `pattern`/`maxLength` to strings.
#[test]
fn int_or_string_fields_are_bounded_by_the_schema() {
    let base = template_sample();
    let ports = ["/spec/ports/0/targetPort", "/spec/probes/port"];
    let port_ok = [
        json!(1),
        json!(8080),
        json!(65535),
        json!("http"),
        json!("grpc-web"),
        json!("h2c"),
        json!("1-web"),
        json!("abcdefghijklmno"),
    ];
    // Strings that are not a container port name can never match one: Kubernetes
    // requires IANA_SVC_NAME of `containers[].ports[].name` (a letter, no "--", <= 15).
    let port_bad = [
        (json!(0), "is below the minimum"),
        (json!(70000), "is above the maximum"),
        (json!(-1), "is below the minimum"),
        (json!("Not_A_Name"), "does not match"),
        (json!("-bad"), "does not match"),
        (json!("web-"), "does not match"),
        (json!("a--b"), "does not match"),
        (json!("8080"), "does not match"),
        (json!("abcdefghijklmnop"), "is longer than maxLength"),
        (json!(80.5), "must be an integer or a string"),
    ];
    let counts = [
        "/spec/rollout/maxSurge",
        "/spec/rollout/maxUnavailable",
        "/spec/disruption/minAvailable",
        "/spec/disruption/maxUnavailable",
    ];
    let count_ok = [json!(0), json!(2), json!("0%"), json!("50%"), json!("7")];
    let count_bad = [
        (json!(-1), "is below the minimum"),
        (json!(-2), "is below the minimum"),
        (json!("50 %"), "does not match"),
        (json!("half"), "does not match"),
        (json!("5o%"), "does not match"),
        (json!("-2"), "does not match"),
    ];
    for (pointers, good, bad) in [
        (&ports[..], &port_ok[..], &port_bad[..]),
        (&counts[..], &count_ok[..], &count_bad[..]),
    ] {
        for pointer in pointers {
            // Siblings that would break a CEL rule of their own (both rollout fields zero,
            // both disruption fields set) are moved out of the way first.
            let mut neutral = base.clone();
            set(&mut neutral, "/spec/rollout/maxSurge", json!(1));
            set(&mut neutral, "/spec/rollout/maxUnavailable", json!(1));
            set(&mut neutral, "/spec/disruption", json!({}));
            for value in good {
                let mut object = neutral.clone();
                set(&mut object, pointer, value.clone());
                let problems = admission_problems(&object);
                assert!(
                    problems.is_empty(),
                    "{pointer} = {value} should pass: {problems:?}"
                );
            }
            for (value, want) in bad {
                let mut object = neutral.clone();
                set(&mut object, pointer, value.clone());
                let problems = admission_problems(&object);
                assert!(
                    problems.iter().any(|p| p.contains(want)),
                    "{pointer} = {value}: want {want:?}, got {problems:?}"
                );
            }
        }
    }
}

/// A change to the sample: the JSON pointer it sets and the value.
type Change = (&'static str, fn() -> Value);

/// One CEL rule, changes that satisfy it and changes that break it.
struct RuleCase {
    rule_contains: &'static str,
    passing: &'static [Change],
    failing: &'static [Change],
}

fn rule_cases() -> Vec<RuleCase> {
    vec![
        RuleCase {
            rule_contains: "has(self.template) != has(self.workloadRef)",
            passing: &[],
            failing: &[(
                "/spec/workloadRef",
                || json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}),
            )],
        },
        // A transition rule: `workload_ref_replicas_cannot_change` gives it an old object.
        RuleCase {
            rule_contains: "self.replicas == oldSelf.replicas",
            passing: &[],
            failing: &[],
        },
        RuleCase {
            rule_contains: "size(self.spec.containers) > 0",
            passing: &[],
            failing: &[("/spec/template/spec/containers", || json!([]))],
        },
        RuleCase {
            rule_contains: "q.name == p.name",
            passing: &[(
                "/spec/ports",
                || json!([{"name": "a", "port": 80}, {"name": "b", "port": 81}]),
            )],
            failing: &[(
                "/spec/ports",
                || json!([{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
            )],
        },
        RuleCase {
            rule_contains: "q.port == p.port",
            passing: &[(
                "/spec/ports",
                || json!([{"name": "a", "port": 80}, {"name": "b", "port": 81}]),
            )],
            failing: &[(
                "/spec/ports",
                || json!([{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
            )],
        },
        RuleCase {
            rule_contains: "self.maxSurge == 0 || self.maxSurge in ['0', '0%']",
            passing: &[
                (
                    "/spec/rollout",
                    || json!({"maxSurge": 0, "maxUnavailable": 1}),
                ),
                (
                    "/spec/rollout",
                    || json!({"maxSurge": "0%", "maxUnavailable": "10%"}),
                ),
                (
                    "/spec/rollout",
                    || json!({"maxSurge": "1", "maxUnavailable": "0"}),
                ),
                (
                    "/spec/rollout",
                    || json!({"maxSurge": 10, "maxUnavailable": "0%"}),
                ),
            ],
            failing: &[
                (
                    "/spec/rollout",
                    || json!({"maxSurge": 0, "maxUnavailable": 0}),
                ),
                (
                    "/spec/rollout",
                    || json!({"maxSurge": "0%", "maxUnavailable": 0}),
                ),
                (
                    "/spec/rollout",
                    || json!({"maxSurge": 0, "maxUnavailable": "0%"}),
                ),
                (
                    "/spec/rollout",
                    || json!({"maxSurge": "0", "maxUnavailable": "0"}),
                ),
                ("/spec/rollout", || json!({"maxSurge": 0})),
            ],
        },
        RuleCase {
            rule_contains: "self.progressDeadlineSeconds > self.minReadySeconds",
            passing: &[(
                "/spec/rollout",
                || json!({"minReadySeconds": 30, "warmupSeconds": 30, "progressDeadlineSeconds": 31}),
            )],
            failing: &[
                ("/spec/rollout", || json!({"minReadySeconds": 600})),
                ("/spec/rollout", || json!({"warmupSeconds": 600})),
            ],
        },
        RuleCase {
            rule_contains: "self.type != 'Header' || has(self.header)",
            passing: &[
                (
                    "/spec/balancing/affinity",
                    || json!({"type": "Header", "header": "x-user"}),
                ),
                ("/spec/balancing/affinity", || json!({"type": "Cookie"})),
                (
                    "/spec/balancing/affinity",
                    || json!({"type": "ClientIP", "trustForwardedFor": true}),
                ),
            ],
            failing: &[("/spec/balancing/affinity", || json!({"type": "Header"}))],
        },
        RuleCase {
            rule_contains: "self.cookie.sameSite != 'None' || self.cookie.secure",
            passing: &[(
                "/spec/balancing/affinity",
                || json!({"type": "Cookie", "cookie": {"sameSite": "None", "secure": true}}),
            )],
            failing: &[(
                "/spec/balancing/affinity",
                || json!({"type": "Cookie", "cookie": {"sameSite": "None"}}),
            )],
        },
        RuleCase {
            rule_contains: "!(has(self.minAvailable) && has(self.maxUnavailable))",
            passing: &[("/spec/disruption", || json!({"minAvailable": 1}))],
            failing: &[(
                "/spec/disruption",
                || json!({"minAvailable": 1, "maxUnavailable": 1}),
            )],
        },
        RuleCase {
            rule_contains: "self.healthCheck.timeoutSeconds <= self.healthCheck.checkIntervalSeconds",
            passing: &[(
                "/spec/proxy/loadBalancer",
                || json!({"type": "Ingress", "healthCheck": {"checkIntervalSeconds": 10, "timeoutSeconds": 5}}),
            )],
            failing: &[(
                "/spec/proxy/loadBalancer",
                || json!({"type": "Gateway", "healthCheck": {"checkIntervalSeconds": 2, "timeoutSeconds": 5}}),
            )],
        },
    ]
}

/// A BalancedService adopting the Deployment `web` instead of carrying a template.
fn adopting(base: &Value) -> Value {
    let mut object = base.clone();
    object["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("template");
    object["spec"]["workloadRef"] =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"});
    object
}

#[test]
fn a_workload_ref_replaces_the_template_and_its_replicas_cannot_change() {
    let base = template_sample();
    let adopting = adopting(&base);
    assert_eq!(admission_problems(&adopting), Vec::<String>::new());
    let mut neither = adopting.clone();
    neither["spec"]
        .as_object_mut()
        .unwrap()
        .remove("workloadRef");
    assert!(
        cel_failures(&neither)
            .iter()
            .any(|r| r.contains("has(self.template) != has(self.workloadRef)")),
        "neither template nor workloadRef must be refused"
    );
    let mut wrong_kind = adopting.clone();
    wrong_kind["spec"]["workloadRef"]["kind"] = json!("StatefulSet");
    assert!(!admission_problems(&wrong_kind).is_empty());

    // `kubectl scale` writes spec.replicas through the scale subresource; the update is
    // validated against the old object.
    let schema = openapi_schema();
    let old = kube_cel::apply_defaults(&schema, &adopting);
    let mut scaled = old.clone();
    scaled["spec"]["replicas"] = json!(7);
    let errors = kube_cel::validate(&schema, &scaled, Some(&old)).expect_err("scale refused");
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("scale the Deployment")),
        "{errors:?}"
    );
    assert!(kube_cel::validate(&schema, &old, Some(&old)).is_ok());
    // Scaling a BalancedService with a template stays allowed.
    let old = kube_cel::apply_defaults(&schema, &base);
    let mut scaled = old.clone();
    scaled["spec"]["replicas"] = json!(7);
    assert!(kube_cel::validate(&schema, &scaled, Some(&old)).is_ok());
}

#[test]
fn every_cel_rule_accepts_a_good_object_and_rejects_a_bad_one() {
    let base = template_sample();
    assert_eq!(
        cel_failures(&base),
        Vec::<String>::new(),
        "the sample itself must pass"
    );
    let cases = rule_cases();

    let mut rules = Vec::new();
    collect_rules(&openapi_schema(), &mut rules);
    for rule in &rules {
        assert!(
            cases.iter().any(|c| rule.contains(c.rule_contains)),
            "CEL rule without a test case: {rule}"
        );
    }

    for case in &cases {
        assert!(
            rules.iter().any(|r| r.contains(case.rule_contains)),
            "no such rule: {}",
            case.rule_contains
        );
        for (pointer, value) in case.passing {
            let mut object = base.clone();
            set(&mut object, pointer, value());
            let failed = cel_failures(&object);
            assert!(
                failed.is_empty(),
                "{pointer} = {} should pass, failed {failed:?}",
                value()
            );
        }
        for (pointer, value) in case.failing {
            let mut object = base.clone();
            set(&mut object, pointer, value());
            let failed = cel_failures(&object);
            assert!(
                failed.iter().any(|r| r.contains(case.rule_contains)),
                "{pointer} = {} should break `{}`, failed {failed:?}",
                value(),
                case.rule_contains
            );
        }
    }
}

#[test]
fn both_zero_rollout_sample_is_rejected_with_its_message() {
    let mut sample = template_sample();
    set(&mut sample, "/spec/rollout/maxSurge", json!(0));
    set(&mut sample, "/spec/rollout/maxUnavailable", json!(0));
    let problems = admission_problems(&sample);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("maxSurge and maxUnavailable cannot both be zero")),
        "{problems:?}"
    );
}

#[test]
fn defaults_round_trip_through_the_schema() {
    // What the API server stores for a minimal object must equal the operator's own
    // defaults, or the two would disagree about an unset field.
    let minimal = json!({
        "apiVersion": "ballast.dev/v1alpha1",
        "kind": "BalancedService",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "image": "app:1"}]}},
            "ports": [{"name": "http", "port": 80}]
        }
    });
    let by_schema = kube_cel::apply_defaults(&openapi_schema(), &minimal);
    let by_schema: BalancedService =
        serde_json::from_value(by_schema).expect("defaulted object reads");
    let by_serde: BalancedService = serde_json::from_value(minimal).expect("minimal object reads");
    assert_eq!(by_schema.spec, by_serde.spec);
    assert_eq!(by_serde.spec.replicas, 2);
    assert_eq!(by_serde.spec.rollout.drain_timeout_seconds, 30);
    assert_eq!(by_serde.spec.proxy.replicas, 2);
}

fn collect_rules(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "x-kubernetes-validations" {
                    for rule in child.as_array().into_iter().flatten() {
                        out.push(rule["rule"].as_str().unwrap_or_default().to_owned());
                    }
                } else {
                    collect_rules(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_rules(i, out)),
        _ => {}
    }
}

/// Sets the value at a JSON pointer, creating missing parent objects.
fn set(object: &mut Value, pointer: &str, value: Value) {
    let mut node = object;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for part in &parts[..parts.len() - 1] {
        node = match node {
            Value::Array(items) => &mut items[part.parse::<usize>().expect("array index")],
            other => other
                .as_object_mut()
                .expect("object on the path")
                .entry(part.to_string())
                .or_insert_with(|| json!({})),
        };
    }
    let last = parts[parts.len() - 1];
    match node {
        Value::Array(items) => items[last.parse::<usize>().expect("array index")] = value,
        other => {
            other
                .as_object_mut()
                .expect("object at the end")
                .insert(last.to_owned(), value);
        }
    }
}
