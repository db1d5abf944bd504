"""Static checks of the alert rules, their tests and runbooks, and the dashboard.

    .venv/bin/python deploy/ci/check_rules.py

* every alert has ``for``, a ``severity`` of warning or critical, ``summary``,
  ``description`` and a ``runbook_url`` that points at docs/runbooks/<alert>.md
  under the one RUNBOOK_BASE, and that runbook exists with the usual sections;
* every alert has a unit test where it fires (each of its severities) and one
  where it stays quiet (``promtool test rules`` runs them);
* the dashboard: fixed uid, a ``$datasource`` variable used by every panel and
  query, ``$__rate_interval`` in every rate(), the required rows, a sane grid;
* every dashboard query parses: they are run through ``promtool check rules``
  as throw-away recording rules (variables replaced by sample values).

The live side (metric names against a real scrape, queries evaluated by a
real Prometheus) is deploy/ci/e2e_prometheus.py.
"""

# ruff: noqa: S603, S607 - runs fixed local tools (kubectl, kubernetes-validate, node, promtool)

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "dashboards"))

from generate import DASHBOARD_UID, RUNBOOK_BASE  # noqa: E402

RULES = ROOT / "dashboards" / "prometheus" / "refreshd.rules.yml"
TESTS = ROOT / "dashboards" / "prometheus" / "refreshd.rules.test.yml"
DASHBOARD = ROOT / "dashboards" / "grafana" / "refreshd.json"
PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"
RUNBOOKS = ROOT / "docs" / "runbooks"

REQUIRED_ROWS = [
    "Throughput",
    "Latency",
    "Schedule lag",
    "Backlog",
    "Failures",
    "Locks and leases",
    "Process health",
]
RUNBOOK_SECTIONS = ["## Meaning", "## Impact", "## Diagnosis", "## Mitigation"]
SEVERITIES = {"warning", "critical"}

#: Sample values for Grafana's variables, so that a query is plain PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "${datasource}": "prometheus",
    "$namespace": ".*",
    "$job": ".*",
    "$profile": ".*",
}


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def check_rules(failures: list[str]) -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts: dict[str, set[str]] = {}
    for group in groups:
        for rule in group["rules"]:
            if "record" in rule:
                continue
            name = rule["alert"]
            where = f"alert {name}"
            if "for" not in rule:
                failures.append(f"{where}: no 'for:'")
            severity = rule.get("labels", {}).get("severity")
            if severity not in SEVERITIES:
                failures.append(f"{where}: severity {severity!r} not in {sorted(SEVERITIES)}")
            alerts.setdefault(name, set()).add(str(severity))
            notes = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not notes.get(key):
                    failures.append(f"{where}: no {key} annotation")
            url = notes.get("runbook_url", "")
            if url != f"{RUNBOOK_BASE}/{name}.md":
                failures.append(f"{where}: runbook_url {url!r} is not {RUNBOOK_BASE}/{name}.md")
            book = RUNBOOKS / f"{name}.md"
            if len(alerts[name]) > 1:
                continue  # the same alert at another severity: runbook checked once
            if not book.exists():
                failures.append(f"{where}: runbook {book.relative_to(ROOT)} is missing")
            else:
                text = book.read_text()
                for section in RUNBOOK_SECTIONS:
                    if section not in text:
                        failures.append(f"{book.relative_to(ROOT)}: no '{section}' section")
    for book in RUNBOOKS.glob("*.md"):
        if book.stem != "README" and book.stem not in alerts:
            failures.append(f"{book.relative_to(ROOT)}: no alert of that name")

    # Test coverage: fires (every severity) and stays quiet, for every alert.
    fired: dict[str, set[str]] = {}
    quiet: set[str] = set()
    for test in yaml.safe_load(TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            name = case["alertname"]
            if case.get("exp_alerts"):
                for alert in case["exp_alerts"]:
                    fired.setdefault(name, set()).add(alert["exp_labels"].get("severity", ""))
            else:
                quiet.add(name)
    for name, severities in sorted(alerts.items()):
        missing = severities - fired.get(name, set())
        if missing:
            failures.append(f"alert {name}: no test where it fires with severity {sorted(missing)}")
        if name not in quiet:
            failures.append(f"alert {name}: no test where it stays quiet")
    print(f"rules: {len(alerts)} alert(s), each with for/severity/summary/description/runbook")
    print(f"rule tests: every alert fires (each severity) and stays quiet in {TESTS.name}")
    return set(alerts)


def check_dashboard(failures: list[str]) -> None:
    board = json.loads(DASHBOARD.read_text())
    if board.get("uid") != DASHBOARD_UID:
        failures.append(f"dashboard uid {board.get('uid')!r} is not {DASHBOARD_UID!r}")
    if board.get("id") is not None:
        failures.append("dashboard has an id: provisioned dashboards must not")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        failures.append("dashboard: no $datasource variable of type datasource (prometheus)")
    for var in variables.values():
        if var["type"] == "query" and var.get("datasource", {}).get("uid") != "${datasource}":
            failures.append(f"variable {var['name']}: not on ${{datasource}}")
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    if rows != REQUIRED_ROWS:
        failures.append(f"dashboard rows {rows} are not {REQUIRED_ROWS}")
    ids = [p["id"] for p in board["panels"]]
    if len(ids) != len(set(ids)):
        failures.append("dashboard: duplicate panel ids")
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        where = f"panel {panel['title']!r}"
        pos = panel["gridPos"]
        if pos["x"] + pos["w"] > 24:
            failures.append(f"{where}: wider than the grid")
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        if area & cells:
            failures.append(f"{where}: overlaps another panel")
        cells |= area
        if panel["type"] == "row":
            continue
        if panel["type"] == "text":
            continue  # no queries
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            failures.append(f"{where}: datasource is not ${{datasource}}")
        if not panel.get("description"):
            failures.append(f"{where}: no description")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                failures.append(f"{where}: a query's datasource is not ${{datasource}}")
            for fn, window in re.findall(r"\b(rate|irate)\([^\[]*\[([^\]]*)\]", target["expr"]):
                if window != "$__rate_interval":
                    failures.append(f"{where}: {fn}() over [{window}], not [$__rate_interval]")

    # Every query parses: promtool checks them as recording rules.
    queries = dashboard_queries(board)
    queries += [
        (f"variable {v['name']}", m.group(1))
        for v in variables.values()
        if v["type"] == "query" and (m := re.match(r"label_values\((.*),\s*\w+\)$", v["query"]))
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query:{n}", "expr": substitute(expr)}
                    for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
        path = f.name
    try:
        out = subprocess.run(
            ["promtool", "check", "rules", path], capture_output=True, text=True, check=False
        )
    finally:
        Path(path).unlink()
    if out.returncode:
        failures.append(f"dashboard queries do not parse:\n{out.stdout}{out.stderr}")
    else:
        print(f"dashboard: {len(queries)} queries parse (promtool check rules)")

    for provisioning in sorted(PROVISIONING.rglob("*.yaml")):
        doc = yaml.safe_load(provisioning.read_text())
        if doc.get("apiVersion") != 1:
            failures.append(f"{provisioning.relative_to(ROOT)}: not a Grafana provisioning file")
    print(f"dashboard: uid {DASHBOARD_UID}, $datasource everywhere, rows {', '.join(rows)}")


def check_docs(failures: list[str], alerts: set[str]) -> None:
    """The docs name every alert, row and recording rule, and only real settings."""
    sys.path.insert(0, str(ROOT))
    from worker.settings import SETTINGS_DOC

    monitoring = (ROOT / "README.md").read_text()  # its "Monitoring" section
    index = (RUNBOOKS / "README.md").read_text()
    board = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    for name in sorted(alerts):
        if name not in monitoring:
            failures.append(f"README.md does not describe alert {name}")
        if name not in index:
            failures.append(f"docs/runbooks/README.md does not list alert {name}")
    for row in rows:
        if f"| {row} |" not in monitoring:
            failures.append(f"README.md does not describe dashboard row {row!r}")
    for record in sorted(records):
        if record not in monitoring:
            failures.append(f"README.md does not describe recording rule {record}")
    known = {env for env, _, _ in SETTINGS_DOC}
    docs = [ROOT / "README.md"]
    for doc in docs + sorted(RUNBOOKS.glob("*.md")):
        for name in sorted(set(re.findall(r"`(REFRESHD_[A-Z_]+)", doc.read_text())) - known):
            failures.append(f"{doc.relative_to(ROOT)} names {name}, which is not a setting")
    print("docs: every alert, row and recording rule described; only real settings named")


def main() -> int:
    failures: list[str] = []
    alerts = check_rules(failures)
    check_dashboard(failures)
    check_docs(failures, alerts)
    if failures:
        print(f"\n{len(failures)} rule/dashboard check(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  FAIL {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
