// Checks the Grafana dashboard against Grafana's own published schema types
// (@grafana/schema): the dashboard model, and each panel's options and field
// config against its panel plugin's types. Unknown or misspelt fields, wrong
// types and missing required fields are errors.
//
//   node deploy/ci/validate-dashboard.mjs dashboards/grafana/refreshd.json
import { readFileSync } from "node:fs";
import { typecheck } from "./tscheck.mjs";

const SCHEMA = "@grafana/schema";
const CFG = (plugin, name) => `${SCHEMA}/dist/esm/raw/composable/${plugin}/panelcfg/x/${name}_types.gen`;
// panel type -> [plugin module, has a FieldConfig type]
const PANELS = {
  timeseries: [CFG("timeseries", "TimeSeriesPanelCfg"), true],
  stat: [CFG("stat", "StatPanelCfg"), false],
  heatmap: [CFG("heatmap", "HeatmapPanelCfg"), true],
  bargauge: [CFG("bargauge", "BarGaugePanelCfg"), false],
  text: [CFG("text", "TextPanelCfg"), false],
};

const path = process.argv[2];
const board = JSON.parse(readFileSync(path, "utf8"));
const imports = [`import type { Dashboard, Panel, RowPanel } from "${SCHEMA}";`];
for (const [type, [module]] of Object.entries(PANELS)) imports.push(`import type * as ${type} from "${module}";`);

const entries = [{ label: `dashboard ${board.uid}`, type: "Dashboard", value: board }];
let failures = 0;
for (const panel of board.panels) {
  const label = `panel ${JSON.stringify(panel.title)} (${panel.type})`;
  if (panel.type === "row") {
    entries.push({ label, type: "RowPanel", value: panel });
    continue;
  }
  const known = PANELS[panel.type];
  if (!known) {
    console.error(`FAIL ${label}: no schema mapped for panel type ${panel.type}`);
    failures++;
    continue;
  }
  // Panel<> leaves options untyped: check them, and the custom field config,
  // against the panel plugin's own types.
  entries.push({ label, type: "Panel", value: panel });
  entries.push({ label: `${label} options`, type: `${panel.type}.Options`, value: panel.options ?? {} });
  if (known[1]) {
    const custom = panel.fieldConfig?.defaults?.custom ?? {};
    entries.push({ label: `${label} fieldConfig.defaults.custom`, type: `${panel.type}.FieldConfig`, value: custom });
  }
}

const errors = typecheck(imports, entries);
for (const error of errors) console.error(`FAIL ${error}`);
if (errors.length || failures) {
  console.error(`dashboard: ${errors.length + failures} schema error(s)`);
  process.exit(1);
}
const panels = board.panels.length;
console.log(`dashboard ${board.uid}: the dashboard and its ${panels} panels match @grafana/schema`);
