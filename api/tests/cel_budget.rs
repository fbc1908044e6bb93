//! The CRD stays inside what the API server accepts: every CEL rule's worst-case cost
//! (with its cardinality) under a budget, and the CRD's size under what client-side
//! `kubectl apply` can store.
//!
//! The API server's limits (k8s.io/apiextensions-apiserver, `validation.go`): a CRD is
//! refused when one rule's estimated cost times its cardinality exceeds
//! `StaticEstimatedCostLimit` (10,000,000) or all rules together exceed
//! `StaticEstimatedCRDCostLimit` (100,000,000). At admission
//! (k8s.io/apiserver/pkg/apis/cel/config.go) one evaluation is stopped at `PerCallLimit`
//! (1,000,000) and all evaluations for one object at `RuntimeCELCostBudget`
//! (10,000,000).

#[path = "support/cel_cost.rs"]
mod cel_cost;

use cel_cost::{RuleCost, estimate_rule, rule_costs};
use kube_cel::{compile_schema, estimate_rule_cost};
use serde_json::{Value, json};

/// Each rule, cardinality included. Equal to `PerCallLimit` and 10x below
/// `StaticEstimatedCostLimit`: a rule within it can neither get the CRD refused nor be
/// cut off while admitting an object.
const RULE_BUDGET: u64 = 1_000_000;

/// All rules together. Equal to `RuntimeCELCostBudget` and 10x below
/// `StaticEstimatedCRDCostLimit`, leaving room for the rules still to come.
const CRD_BUDGET: u64 = 10_000_000;

/// Client-side `kubectl apply` keeps the whole object, as JSON, in its last-applied
/// annotation, and the API server refuses more than 256 KiB of annotations.
const CRD_JSON_BUDGET: usize = 200 * 1024;

fn openapi_schema() -> Value {
    let crd = serde_json::to_value(ballast_api::crd()).expect("CRD serializes");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn sum_of(costs: &[RuleCost]) -> u64 {
    costs.iter().fold(0, |sum, c| sum.saturating_add(c.total()))
}

fn table(costs: &[RuleCost]) -> String {
    let mut out = format!(
        "{:>10} {:>6} {:>11}  {}\n",
        "per call", "x card", "= total", "rule"
    );
    for c in costs {
        out += &format!(
            "{:>10} {:>6} {:>11}  {}: {}\n",
            c.per_call,
            c.cardinality,
            c.total(),
            c.path,
            c.rule
        );
    }
    let sum = sum_of(costs);
    out + &format!("{:>29}  all rules\n", sum)
}

#[test]
fn every_cel_rule_fits_the_budget_with_its_cardinality() {
    let schema = openapi_schema();
    let costs = rule_costs(&schema).unwrap_or_else(|e| panic!("cannot estimate: {e}"));
    assert!(!costs.is_empty(), "the CRD has CEL rules");
    let report = table(&costs);
    println!("{report}");

    let over: Vec<&RuleCost> = costs.iter().filter(|c| c.total() > RULE_BUDGET).collect();
    assert!(
        over.is_empty(),
        "rules over the per-rule budget of {RULE_BUDGET}:\n{report}"
    );
    let sum = sum_of(&costs);
    assert!(
        sum <= CRD_BUDGET,
        "rules sum to {sum}, over the CRD budget of {CRD_BUDGET}:\n{report}"
    );
}

/// kube-cel's own cost heuristic and missing-bounds check have no complaint about any
/// rule. (Its scope check is not used: it takes the variables of `all`/`filter` for
/// undeclared ones; `support/cel_cost.rs` refuses an unknown identifier instead.)
#[test]
fn kube_cel_analysis_finds_nothing() {
    let schema = openapi_schema();
    let mut warnings = Vec::new();
    let mut nodes = vec![&schema];
    while let Some(node) = nodes.pop() {
        let rules = node["x-kubernetes-validations"].as_array();
        for rule in rules
            .into_iter()
            .flatten()
            .filter_map(|r| r["rule"].as_str())
        {
            warnings.extend(estimate_rule_cost(rule, &compile_schema(node)));
        }
        nodes.extend(
            node["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, v)| v),
        );
        nodes.extend(node.get("items"));
        nodes.extend(node.get("additionalProperties").filter(|v| v.is_object()));
    }
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// The estimator reproduces the API server's answer to the rule it refused: "estimated
/// rule cost exceeds budget by factor of 6.0x" for the int-or-string rule on
/// `spec.ports[].targetPort` (16 ports).
#[test]
fn estimator_reproduces_the_refused_target_port_rule() {
    let old_rule = "string(self).matches('^[0-9]+$') ? (int(string(self)) >= 1 && \
                    int(string(self)) <= 65535) : \
                    string(self).matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
    let schema = json!({
        "type": "object",
        "properties": {"ports": {
            "type": "array",
            "maxItems": 16,
            "items": {
                "type": "object",
                "properties": {"targetPort": {
                    "x-kubernetes-int-or-string": true,
                    "x-kubernetes-validations": [{"rule": old_rule}],
                }},
            },
        }},
    });
    let costs = rule_costs(&schema).expect("modelled");
    let [cost] = costs.as_slice() else {
        panic!("one rule expected: {costs:?}")
    };
    assert_eq!(cost.path, ".ports[].targetPort");
    assert_eq!(cost.cardinality, 16);
    assert!(
        (3_700_000..3_850_000).contains(&cost.per_call),
        "about 3.77M per call, got {}",
        cost.per_call
    );
    let factor = cost.total() as f64 / 10_000_000.0;
    assert_eq!(format!("{factor:.1}"), "6.0");
}

#[test]
fn estimator_counts_an_unbounded_list_as_a_whole_request() {
    let schema = json!({
        "type": "object",
        "properties": {"hosts": {
            "type": "array",
            "items": {
                "type": "string",
                "maxLength": 10,
                "x-kubernetes-validations": [{"rule": "self != 'localhost'"}],
            },
        }},
    });
    let costs = rule_costs(&schema).expect("modelled");
    assert_eq!(costs[0].cardinality, cel_cost::MAX_REQUEST_BYTES);
    assert!(costs[0].total() > RULE_BUDGET, "{costs:?}");
}

#[test]
fn estimator_sizes_strings_by_max_length() {
    let bounded = json!({"type": "string", "maxLength": 100});
    let unbounded = json!({"type": "string"});
    let rule = "self.matches('^[a-z]+$')";
    let small = estimate_rule(rule, &bounded).expect("modelled");
    let large = estimate_rule(rule, &unbounded).expect("modelled");
    assert!(small < 100, "{small}");
    assert!(large > 500_000, "{large}");
}

#[test]
fn estimator_refuses_what_it_does_not_model() {
    let schema = json!({"type": "string", "maxLength": 10});
    let error = estimate_rule("self.lowerAscii() == self", &schema).expect_err("unmodelled");
    assert!(error.contains("lowerAscii"), "{error}");
}

#[test]
fn crd_json_fits_the_last_applied_annotation() {
    let json = serde_json::to_vec(&ballast_api::crd()).expect("CRD serializes");
    println!("CRD JSON: {} bytes", json.len());
    assert!(
        json.len() < CRD_JSON_BUDGET,
        "the CRD is {} bytes of JSON, over the budget of {CRD_JSON_BUDGET}",
        json.len()
    );
}
