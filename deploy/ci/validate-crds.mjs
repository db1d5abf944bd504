// Checks refreshd's custom resources against their CRD schemas.
//
//   node deploy/ci/validate-crds.mjs objects.json
//
// objects.json: a JSON array of rendered objects (check_manifests.py writes it).
// Two checks per object, both from the @kubernetes-models packages, which are
// generated from the CRDs' published OpenAPI schemas:
//   1. the JSON schema (types, enums, patterns, required fields), through the
//      model's validate();
//   2. unknown fields: the schemas allow extra properties (the API server would
//      prune them silently), so every object is also type-checked against the
//      model's TypeScript interface, where an unknown or misspelt field is an
//      error (like kubectl's strict field validation).
import { readFileSync } from "node:fs";
import { typecheck } from "./tscheck.mjs";

const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": {
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
    className: "ServiceMonitor",
    iface: "IServiceMonitor",
  },
  "monitoring.coreos.com/v1/PrometheusRule": {
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
    className: "PrometheusRule",
    iface: "IPrometheusRule",
  },
  "keda.sh/v1alpha1/ScaledObject": {
    module: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
    className: "ScaledObject",
    iface: "IScaledObject",
  },
};

const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failures = 0;
const entries = [];
const imports = new Set();

for (const obj of objects) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const label = `${obj.kind}/${obj.metadata?.name} (${obj.apiVersion})`;
  const model = MODELS[key];
  if (!model) {
    console.error(`FAIL ${label}: no schema known for ${key}`);
    failures++;
    continue;
  }
  const mod = await import(model.module);
  try {
    new mod[model.className](obj).validate();
    console.log(`ok   ${label}: schema`);
  } catch (err) {
    console.error(`FAIL ${label}: ${err.message}`);
    failures++;
  }
  imports.add(`import type { ${model.iface} } from "${model.module}";`);
  entries.push({ label, type: model.iface, value: obj });
}

const errors = entries.length ? typecheck([...imports], entries) : [];
for (const error of errors) console.error(`FAIL ${error}`);
if (errors.length) failures++;
else for (const e of entries) console.log(`ok   ${e.label}: no unknown fields`);

if (failures) {
  console.error(`custom resources: ${failures} check(s) failed`);
  process.exit(1);
}
console.log(`${objects.length} custom resource(s) valid`);
