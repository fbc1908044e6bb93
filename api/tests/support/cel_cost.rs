//! Offline worst-case cost of a CRD's CEL rules, as the API server estimates it when the
//! CRD is created: each rule's cost per evaluation (cel-go's static cost model,
//! `checker/cost.go`, with Kubernetes' sizing of schema values) times its cardinality
//! (how often it can run in one object: the product of the `maxItems`/`maxProperties` of
//! the lists and maps around it).
//!
//! kube-cel's `analysis` module sizes every unbounded string at 1,000 characters and
//! ignores cardinality, so it cannot see what makes the API server refuse a CRD (an
//! int-or-string sized at a whole request, a rule inside a list). This model follows the
//! API server where it is known and is conservative where it is not: an unbounded value
//! is as large as a request, a conversion or comparison walks its whole input, and
//! anything it does not know (a function, an equality of lists) is an error rather than a
//! guess.

use kube_cel::cel::common::ast::{Expr, LiteralValue};
use kube_cel::cel::{IdedExpr, Program};
use serde_json::Value;
use std::collections::HashMap;

/// The largest request the API server accepts (`MaxRequestSizeBytes`, 3 MiB). It sizes a
/// string without `maxLength`, a list without `maxItems` and a map without
/// `maxProperties` by it.
pub const MAX_REQUEST_BYTES: u64 = 3 * 1024 * 1024;

/// Size the API server gives an int-or-string value: a `dyn` as long as a request less
/// its two quotes (`apiserver/pkg/cel/common/schemas.go`), whatever `maxLength` says.
pub const INT_OR_STRING_SIZE: u64 = MAX_REQUEST_BYTES - 2;

// cel-go's cost constants (`common/cost.go`).
const SELECT_AND_IDENT_COST: u64 = 1;
const LIST_CREATE_BASE_COST: u64 = 10;
const MAP_CREATE_BASE_COST: u64 = 30;

/// One rule's worst case.
#[derive(Debug, Clone)]
pub struct RuleCost {
    /// Where the rule sits, as `.spec.ports[].targetPort`.
    pub path: String,
    /// The rule's text.
    pub rule: String,
    /// Worst-case cost of one evaluation.
    pub per_call: u64,
    /// Most evaluations in one object.
    pub cardinality: u64,
}

impl RuleCost {
    /// What the API server compares with its per-rule limit.
    pub fn total(&self) -> u64 {
        self.per_call.saturating_mul(self.cardinality)
    }
}

/// Every `x-kubernetes-validations` rule in `schema` with its worst case, or the first
/// rule the model cannot estimate and why.
pub fn rule_costs(schema: &Value) -> Result<Vec<RuleCost>, String> {
    let mut out = Vec::new();
    walk(schema, "", 1, &mut out)?;
    Ok(out)
}

fn walk(node: &Value, path: &str, cardinality: u64, out: &mut Vec<RuleCost>) -> Result<(), String> {
    for rule in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = rule["rule"].as_str().unwrap_or_default();
        let per_call = estimate_rule(text, node).map_err(|e| format!("{path}: `{text}`: {e}"))?;
        out.push(RuleCost {
            path: if path.is_empty() {
                ".".to_owned()
            } else {
                path.to_owned()
            },
            rule: text.to_owned(),
            per_call,
            cardinality,
        });
    }
    for (name, child) in node["properties"].as_object().into_iter().flatten() {
        walk(child, &format!("{path}.{name}"), cardinality, out)?;
    }
    if let Some(items) = node.get("items") {
        let n = node["maxItems"].as_u64().unwrap_or(MAX_REQUEST_BYTES);
        walk(
            items,
            &format!("{path}[]"),
            cardinality.saturating_mul(n),
            out,
        )?;
    }
    if let Some(values @ Value::Object(_)) = node.get("additionalProperties") {
        let n = node["maxProperties"].as_u64().unwrap_or(MAX_REQUEST_BYTES);
        walk(
            values,
            &format!("{path}.*"),
            cardinality.saturating_mul(n),
            out,
        )?;
    }
    Ok(())
}

/// Worst-case cost of one evaluation of `rule` with `self` bound to `node`.
pub fn estimate_rule(rule: &str, node: &Value) -> Result<u64, String> {
    let program = Program::compile(rule).map_err(|e| format!("does not parse: {e:?}"))?;
    let mut scope = Scope::default();
    scope.push("self", Est::of_schema(node));
    // A transition rule's previous value has the same schema.
    scope.push("oldSelf", Est::of_schema(node));
    Ok(estimate(program.expression(), &mut scope)?.cost)
}

/// What the model knows about an expression: its cost, how large its value can be
/// (characters of a string, entries of a list or map, 1 for a scalar), and, for a value
/// taken from the object, its schema.
#[derive(Clone, Debug)]
struct Est<'a> {
    cost: u64,
    size: u64,
    kind: Kind,
    schema: Option<&'a Value>,
    /// For lists and maps: the estimate of one element (of one key for a map).
    element: Option<Box<Est<'a>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Scalar,
    String,
    List,
    Map,
    /// An int-or-string or a value of unknown type.
    Dyn,
}

impl<'a> Est<'a> {
    fn scalar(cost: u64) -> Self {
        Est {
            cost,
            size: 1,
            kind: Kind::Scalar,
            schema: None,
            element: None,
        }
    }

    fn string(cost: u64, size: u64) -> Self {
        Est {
            size,
            kind: Kind::String,
            ..Est::scalar(cost)
        }
    }

    /// A value taken from the object, sized as the API server sizes it. Costs nothing
    /// by itself: the identifier or selection that reaches it is charged.
    fn of_schema(schema: &'a Value) -> Self {
        let flag = |key: &str| schema[key] == Value::Bool(true);
        let mut est = Est {
            schema: Some(schema),
            ..Est::scalar(0)
        };
        if flag("x-kubernetes-int-or-string") {
            est.kind = Kind::Dyn;
            est.size = INT_OR_STRING_SIZE;
            return est;
        }
        match schema["type"].as_str() {
            Some("string") => {
                est.kind = Kind::String;
                est.size = schema["maxLength"].as_u64().unwrap_or_else(|| {
                    let longest_enum = schema["enum"].as_array().map(|values| {
                        values
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|v| v.chars().count() as u64)
                            .max()
                            .unwrap_or(0)
                    });
                    longest_enum.unwrap_or(MAX_REQUEST_BYTES)
                });
            }
            Some("array") => {
                est.kind = Kind::List;
                est.size = schema["maxItems"].as_u64().unwrap_or(MAX_REQUEST_BYTES);
                est.element = schema
                    .get("items")
                    .map(|items| Box::new(Est::of_schema(items)));
            }
            Some("object") if schema.get("properties").is_some() => {
                est.kind = Kind::Map;
                est.size = schema["properties"]
                    .as_object()
                    .map_or(0, |p| p.len() as u64);
            }
            Some("object") => {
                est.kind = Kind::Map;
                est.size = schema["maxProperties"]
                    .as_u64()
                    .unwrap_or(MAX_REQUEST_BYTES);
                est.element = Some(Box::new(Est::string(0, MAX_REQUEST_BYTES)));
            }
            Some("integer" | "number" | "boolean") => {}
            _ => {
                est.kind = Kind::Dyn;
                est.size = MAX_REQUEST_BYTES;
            }
        }
        est
    }

    fn with_cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }
}

#[derive(Default)]
struct Scope<'a> {
    vars: HashMap<String, Vec<Est<'a>>>,
}

impl<'a> Scope<'a> {
    fn push(&mut self, name: &str, est: Est<'a>) {
        self.vars.entry(name.to_owned()).or_default().push(est);
    }

    fn pop(&mut self, name: &str) {
        if let Some(stack) = self.vars.get_mut(name) {
            stack.pop();
        }
    }

    fn get(&self, name: &str) -> Option<&Est<'a>> {
        self.vars.get(name).and_then(|stack| stack.last())
    }
}

/// Cost of walking `size` characters: cel-go's `StringTraversalCostFactor` (0.1 per
/// character), rounded up as its `MultiplyByCostFactor` does.
fn walk_string(size: u64) -> u64 {
    size.div_ceil(10)
}

/// Cost factor of a regular expression of `size` characters: cel-go's
/// `RegexStringLengthCostFactor` (0.25 per character), rounded up.
fn regex_factor(size: u64) -> u64 {
    size.div_ceil(4)
}

fn estimate<'a>(expr: &IdedExpr, scope: &mut Scope<'a>) -> Result<Est<'a>, String> {
    match &expr.expr {
        Expr::Literal(LiteralValue::String(s)) => Ok(Est::string(0, s.chars().count() as u64)),
        Expr::Literal(LiteralValue::Bytes(b)) => Ok(Est::string(0, b.len() as u64)),
        Expr::Literal(_) => Ok(Est::scalar(0)),
        Expr::Ident(name) => scope
            .get(name)
            .cloned()
            .map(|est| est.with_cost(SELECT_AND_IDENT_COST))
            .ok_or_else(|| format!("unknown identifier `{name}`")),
        Expr::Select(select) => {
            let operand = estimate(&select.operand, scope)?;
            let cost = operand.cost.saturating_add(SELECT_AND_IDENT_COST);
            if select.test {
                return Ok(Est::scalar(cost));
            }
            let field = operand.schema.and_then(|s| {
                s["properties"]
                    .get(&select.field)
                    .or_else(|| s.get("additionalProperties").filter(|v| v.is_object()))
            });
            match field {
                Some(schema) => Ok(Est::of_schema(schema).with_cost(cost)),
                None => Err(format!("`.{}` is not in the schema", select.field)),
            }
        }
        Expr::List(list) => {
            let mut cost = LIST_CREATE_BASE_COST;
            let mut element: Option<Est<'a>> = None;
            for item in &list.elements {
                let est = estimate(item, scope)?;
                cost = cost.saturating_add(est.cost);
                element = Some(match element {
                    Some(e) if e.size >= est.size => e,
                    _ => est,
                });
            }
            Ok(Est {
                size: list.elements.len() as u64,
                kind: Kind::List,
                element: element.map(|e| Box::new(e.with_cost(0))),
                ..Est::scalar(cost)
            })
        }
        Expr::Map(map) => {
            if !map.entries.is_empty() {
                return Err("map literals with entries are not modelled".to_owned());
            }
            Ok(Est {
                size: 0,
                kind: Kind::Map,
                ..Est::scalar(MAP_CREATE_BASE_COST)
            })
        }
        Expr::Comprehension(comp) => {
            let range = estimate(&comp.iter_range, scope)?;
            let init = estimate(&comp.accu_init, scope)?;
            let item = match range.kind {
                Kind::List | Kind::Map => range
                    .element
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| Est::string(0, MAX_REQUEST_BYTES)),
                _ => return Err("comprehension over a value that is not a list or map".to_owned()),
            };
            // A list accumulator (filter, map) grows up to one entry per iteration.
            let accu = match init.kind {
                Kind::List => Est {
                    size: range.size,
                    element: Some(Box::new(item.clone())),
                    ..init.clone()
                },
                _ => init.clone(),
            };
            scope.push(&comp.iter_var, item.with_cost(0));
            scope.push(&comp.accu_var, accu.clone().with_cost(0));
            let per_item = estimate(&comp.loop_cond, scope).and_then(|cond| {
                let step = estimate(&comp.loop_step, scope)?;
                Ok(cond.cost.saturating_add(step.cost))
            });
            scope.pop(&comp.iter_var);
            let result = estimate(&comp.result, scope);
            scope.pop(&comp.accu_var);
            let (per_item, result) = (per_item?, result?);
            let cost = range
                .cost
                .saturating_add(init.cost)
                .saturating_add(range.size.saturating_mul(per_item))
                .saturating_add(result.cost);
            Ok(result.with_cost(cost))
        }
        Expr::Call(call) => {
            let target = match &call.target {
                Some(t) => Some(estimate(t, scope)?),
                None => None,
            };
            let args = call
                .args
                .iter()
                .map(|a| estimate(a, scope))
                .collect::<Result<Vec<_>, _>>()?;
            let inputs = target
                .iter()
                .chain(&args)
                .fold(0u64, |sum, e| sum.saturating_add(e.cost));
            call_cost(&call.func_name, target.as_ref(), &args, inputs)
        }
        Expr::Struct(_) | Expr::Unspecified => Err("struct literals are not modelled".to_owned()),
    }
}

/// A call's estimate: `inputs` (the cost of evaluating target and arguments) plus the
/// call's own cost.
fn call_cost<'a>(
    name: &str,
    target: Option<&Est<'a>>,
    args: &[Est<'a>],
    inputs: u64,
) -> Result<Est<'a>, String> {
    let arg = |i: usize| {
        args.get(i)
            .ok_or_else(|| format!("`{name}` without argument {i}"))
    };
    let plus = |own: u64| inputs.saturating_add(own);
    match name {
        // Short-circuiting: the worst case evaluates both sides.
        "_&&_" | "_||_" => Ok(Est::scalar(inputs)),
        "_?_:_" => {
            let (cond, then, other) = (arg(0)?, arg(1)?, arg(2)?);
            let branch = if then.cost >= other.cost { then } else { other };
            let size = then.size.max(other.size);
            Ok(Est {
                size,
                schema: None,
                ..branch.clone()
            }
            .with_cost(cond.cost.saturating_add(then.cost.max(other.cost))))
        }
        "!_" | "-_" | "@not_strictly_false" | "size" | "_-_" | "_*_" | "_/_" | "_%_" => {
            Ok(Est::scalar(plus(1)))
        }
        "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => {
            let (l, r) = (arg(0)?, arg(1)?);
            if [l.kind, r.kind]
                .iter()
                .any(|k| matches!(k, Kind::List | Kind::Map))
            {
                return Err(format!("`{name}` on lists or maps is not modelled"));
            }
            // Equal values have equal sizes, so a comparison stops at the shorter one.
            Ok(Est::scalar(plus(walk_string(l.size.min(r.size)).max(1))))
        }
        "@in" => {
            let (needle, haystack) = (arg(0)?, arg(1)?);
            let element = haystack
                .element
                .as_deref()
                .map_or(MAX_REQUEST_BYTES, |e| e.size);
            let each = walk_string(needle.size.min(element)).max(1);
            Ok(Est::scalar(plus(haystack.size.saturating_mul(each))))
        }
        "_+_" => {
            let (l, r) = (arg(0)?, arg(1)?);
            let size = l.size.saturating_add(r.size);
            match (l.kind, r.kind) {
                (Kind::Scalar, Kind::Scalar) => Ok(Est::scalar(plus(1))),
                (Kind::List, Kind::List) => Ok(Est { size, ..l.clone() }.with_cost(plus(1))),
                _ => Ok(Est::string(plus(walk_string(size)), size)),
            }
        }
        "_[_]" => {
            let (container, _) = (arg(0)?, arg(1)?);
            let element = container
                .schema
                .and_then(|s| s.get("items").or_else(|| s.get("additionalProperties")))
                .filter(|s| s.is_object());
            match element {
                Some(schema) => Ok(Est::of_schema(schema).with_cost(plus(1))),
                None => Err("index into a value without an item schema".to_owned()),
            }
        }
        "string" => {
            let input = target.or(args.first()).ok_or("`string` without argument")?;
            let size = match input.kind {
                Kind::Scalar => 20,
                _ => input.size,
            };
            Ok(Est::string(plus(walk_string(size)), size))
        }
        // Parsing a string walks it; a number converts in constant time.
        "int" | "uint" | "double" => {
            let input = target
                .or(args.first())
                .ok_or("conversion without argument")?;
            Ok(Est::scalar(plus(walk_string(input.size).max(1))))
        }
        "matches" => {
            let (text, regex) = match target {
                Some(t) => (t, arg(0)?),
                None => (arg(0)?, arg(1)?),
            };
            // cel-go: (length + 1) x 0.1 for the string times length x 0.25 for the regex.
            let own = walk_string(text.size.saturating_add(1))
                .saturating_mul(regex_factor(regex.size).max(1));
            Ok(Est::scalar(plus(own)))
        }
        "contains" | "startsWith" | "endsWith" => {
            let (text, part) = (target.ok_or("string function without target")?, arg(0)?);
            let own = walk_string(text.size).saturating_mul(walk_string(part.size).max(1));
            Ok(Est::scalar(plus(own)))
        }
        other => Err(format!(
            "function `{other}` is not modelled; add its cel-go cost to support/cel_cost.rs"
        )),
    }
}
