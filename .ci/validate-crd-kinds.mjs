// Validates the objects of CRD-defined kinds that Kubernetes' own schemas do not
// cover: GKE's (cloud.google.com, networking.gke.io), the Gateway API's
// (gateway.networking.k8s.io) and the Prometheus Operator's (monitoring.coreos.com),
// against the validators that @kubernetes-models
// generates from the published CRDs. Those validators check types, required fields
// and enums but, like the API server's structural schemas, let unknown fields through
// (the API server would prune them silently), so every field name under `spec` is
// also checked against the names the kind's schema declares (except the keys of
// free-form maps: labels, annotations, matchLabels).
//
//   node validate-crd-kinds.mjs NODE_MODULES FILE...
import { readFileSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const [modules, ...files] = process.argv.slice(2);
const require = createRequire(path.join(modules, "noop.js"));
const YAML = require("yaml");

const packages = {
  "cloud.google.com": "@kubernetes-models/gke",
  "networking.gke.io": "@kubernetes-models/gke",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

// Fields whose keys are data, not field names.
const freeFormMaps = new Set(["labels", "annotations", "matchLabels"]);

// The schema file of a kind and every schema file it imports, as text.
function schemaText(pkg, group, version, kind) {
  const dir = path.join(modules, pkg, "_schemas");
  const camel = (s) => s.split(/[.-]/).map((p) => p[0].toUpperCase() + p.slice(1)).join("");
  const v = version[0].toUpperCase() + version.slice(1);
  const candidates = [
    `${camel(group)}${v}${kind}.js`,
    `IoK8sSigsGatewayApiApis${v}${kind}.js`,
    `ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoring${v}${kind}.js`,
  ];
  const first = candidates.map((c) => path.join(dir, c)).find(existsSync);
  if (!first) return null;
  const seen = new Set();
  const queue = [first];
  let text = "";
  while (queue.length) {
    const file = queue.pop();
    if (seen.has(file) || !existsSync(file)) continue;
    seen.add(file);
    const source = readFileSync(file, "utf8");
    text += source;
    // Relative imports, and the shared ones (@kubernetes-models/apimachinery's
    // LabelSelector, ...) that other packages' schemas import by package name.
    for (const m of source.matchAll(/(?:from|require\()\s*"((?:\.{1,2}|@kubernetes-models)\/[^"]+)"/g)) {
      const target = m[1].startsWith(".")
        ? path.resolve(path.dirname(file), m[1])
        : path.join(modules, m[1]);
      if (target.startsWith(modules) && target.includes("_schemas")) {
        queue.push(target.endsWith(".js") ? target : `${target}.js`);
      }
    }
  }
  return text;
}

// Every property name under `value`, with its path.
function* fieldNames(value, at) {
  if (Array.isArray(value)) {
    for (const [i, item] of value.entries()) yield* fieldNames(item, `${at}[${i}]`);
  } else if (value && typeof value === "object") {
    for (const [key, inner] of Object.entries(value)) {
      yield [key, `${at}.${key}`];
      if (!freeFormMaps.has(key)) yield* fieldNames(inner, `${at}.${key}`);
    }
  }
}

let failed = 0;
let checked = 0;
for (const file of files) {
  for (const doc of YAML.parseAllDocuments(readFileSync(file, "utf8"))) {
    const object = doc.toJSON();
    if (!object || !object.apiVersion) continue;
    const [group, version] = object.apiVersion.includes("/")
      ? object.apiVersion.split("/")
      : ["", object.apiVersion];
    const pkg = packages[group];
    if (!pkg) continue;
    const label = `${file}: ${object.kind} ${object.metadata?.namespace ?? ""}/${object.metadata?.name ?? "?"}`;
    let Model;
    try {
      const module = await import(path.join(modules, pkg, group, version, `${object.kind}.js`));
      // The GKE package is CommonJS: its exports come as `default`.
      Model = module[object.kind] ?? module.default?.[object.kind];
    } catch {
      Model = undefined;
    }
    const schema = schemaText(pkg, group, version, object.kind);
    if (!Model || !schema) {
      console.log(`ERROR ${label}: ${pkg} has no ${object.apiVersion} ${object.kind}`);
      failed = 1;
      continue;
    }
    const problems = [];
    try {
      new Model(object).validate();
    } catch (e) {
      problems.push(e.message);
    }
    for (const [name, at] of fieldNames(object.spec, "spec")) {
      if (!schema.includes(`parentDataProperty:"${name}"`)) {
        problems.push(`${at}: no field ${JSON.stringify(name)} in the published schema`);
      }
    }
    checked++;
    if (problems.length) {
      failed = 1;
      console.log(`ERROR ${label}:\n  ${problems.join("\n  ")}`);
    } else {
      console.log(`OK    ${label}`);
    }
  }
}
console.log(`validate-crd-kinds: ${checked} objects checked, ${failed ? "FAILED" : "all valid"}`);
process.exit(failed);
