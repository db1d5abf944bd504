"""Generates refreshd's Prometheus rules and Grafana dashboard from one place.

    .venv/bin/python dashboards/generate.py          # rewrite the generated files
    .venv/bin/python dashboards/generate.py --check  # exit 1 if any is out of date (CI)

Outputs (committed; never edit them by hand):

* ``dashboards/prometheus/refreshd.rules.yml``: recording and alerting rules,
  a plain Prometheus rule file (``promtool check rules`` / ``test rules``);
* ``deploy/components/monitoring/prometheusrule.yaml``: the same groups wrapped
  in a prometheus-operator ``PrometheusRule``;
* ``dashboards/grafana/refreshd.json``: the Grafana dashboard (fixed uid).

Every PromQL expression here may only use metrics that the worker exports
(``worker/metrics.py``) or Prometheus adds to every target (``up``);
``deploy/ci/e2e_prometheus.py`` checks that against a live scrape.

Aggregation: rules keep ``namespace`` and ``job`` so that several refreshd
deployments watched by one Prometheus stay apart. ``refreshd_backlog``,
``refreshd_backlog_oldest_age_seconds`` and ``refreshd_scheduled_credentials``
describe the shared Redis schedule, so every replica reports the same value:
they are combined with ``max``, never ``sum``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

#: Where the runbooks are published; the one place to change for a fork.
RUNBOOK_BASE = "https://github.com/example/refreshd/blob/main/docs/runbooks"

RULES_FILE = ROOT / "dashboards" / "prometheus" / "refreshd.rules.yml"
PROMETHEUS_RULE_FILE = ROOT / "deploy" / "components" / "monitoring" / "prometheusrule.yaml"
DASHBOARD_FILE = ROOT / "dashboards" / "grafana" / "refreshd.json"

DASHBOARD_UID = "refreshd-overview"
BY = "namespace, job"
FAILED = 'outcome=~"retry|needs_reauth|quarantined"'
DECIDED = 'outcome!="skipped"'
REFRESHED = 'outcome="refreshed"'
NEEDS_REAUTH = 'outcome="needs_reauth"'

Rule = dict[str, Any]

# --------------------------------------------------------------------------
# Recording rules. Each must return data while a healthy worker runs (the
# end-to-end check waits for every one of them).

RECORDING: list[Rule] = [
    {
        "record": "job:refreshd_refreshes:rate5m",
        "expr": f"sum by ({BY}, profile, outcome, reason) (rate(refreshd_refreshes_total[5m]))",
    },
    {
        # Attempts that did not refresh (retry, needs_reauth, quarantined) over
        # all attempts that reached a decision (skipped = lost the claim before
        # sending, not a provider failure). 0, not absent, when nothing fails.
        "record": "job:refreshd_refresh_failure_ratio:rate5m",
        "expr": (
            f"sum by ({BY}, profile) (job:refreshd_refreshes:rate5m{{{FAILED}}})\n"
            "  /\n"
            f'sum by ({BY}, profile) (job:refreshd_refreshes:rate5m{{outcome!="skipped"}})\n'
            "or\n"
            f'0 * sum by ({BY}, profile) (job:refreshd_refreshes:rate5m{{outcome!="skipped"}})\n'
        ),
    },
    *[
        {
            "record": "job:refreshd_schedule_lag_seconds:histogram_quantile5m",
            "expr": (
                f"histogram_quantile({q}, sum by ({BY}, le) "
                "(rate(refreshd_schedule_lag_seconds_bucket[5m])))"
            ),
            "labels": {"quantile": q},
        }
        for q in ("0.5", "0.9", "0.99")
    ],
    *[
        {
            "record": "job_profile:refreshd_refresh_duration_seconds:histogram_quantile5m",
            "expr": (
                f"histogram_quantile({q}, sum by ({BY}, profile, le) "
                "(rate(refreshd_refresh_duration_seconds_bucket[5m])))"
            ),
            "labels": {"quantile": q},
        }
        for q in ("0.5", "0.9", "0.99")
    ],
    {"record": "job:refreshd_backlog:max", "expr": f"max by ({BY}) (refreshd_backlog)"},
    {
        "record": "job:refreshd_backlog_oldest_age_seconds:max",
        "expr": f"max by ({BY}) (refreshd_backlog_oldest_age_seconds)",
    },
    {
        "record": "job:refreshd_scheduled_credentials:max",
        "expr": f"max by ({BY}) (refreshd_scheduled_credentials)",
    },
    {"record": "job:refreshd_in_flight:sum", "expr": f"sum by ({BY}) (refreshd_in_flight)"},
    {
        "record": "job:refreshd_workers:count",
        "expr": f"count by ({BY}) (refreshd_heartbeat_timestamp_seconds)",
    },
    {
        "record": "job:refreshd_expired_before_refresh:rate5m",
        "expr": f"sum by ({BY}) (rate(refreshd_expired_before_refresh_total[5m]))",
    },
]

# --------------------------------------------------------------------------
# Alerts. Correctness alarms (lease lost, quarantine, rejected commit) fire
# on the first event (for: 0m). Their counters carry labels, so a series only
# appears at its first increment, at 1, and increase() cannot see that first
# step: `x unless x offset 10m` catches a series that is new in the window.


def _events(selector: str, by: str, window: str = "10m") -> str:
    """Increments of a labelled counter in the last *window*, first one included."""
    return (
        f"(sum by ({by}) (increase({selector}[{window}])) > 0)\n"
        "or\n"
        f"sum by ({by}) ({selector} unless {selector} offset {window})\n"
    )


WHERE = "{{ $labels.namespace }}/{{ $labels.job }}"


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
) -> Rule:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{RUNBOOK_BASE}/{name}.md",
        },
    }


NEEDS_REAUTH_15M = (
    "sum by (namespace, job, profile) "
    '(increase(refreshd_refreshes_total{outcome="needs_reauth"}[15m]))'
)
ATTEMPTS_15M = (
    'sum by (namespace, job, profile) (increase(refreshd_refreshes_total{outcome!="skipped"}[15m]))'
)

ALERTS: list[Rule] = [
    _alert(
        "RefreshdTokensExpiredBeforeRefresh",
        "job:refreshd_expired_before_refresh:rate5m > 0",
        "5m",
        "critical",
        "Access tokens expire before refreshd refreshes them",
        f"{WHERE}: refreshes keep starting after the access token had already expired "
        "({{ $value | humanize }}/s over 5 minutes, for 5 minutes). Consumers of these "
        "credentials hold expired tokens until the refresh lands.",
    ),
    _alert(
        "RefreshdRefreshFailureRatioHigh",
        "job:refreshd_refresh_failure_ratio:rate5m > 0.1\n"
        "and on (namespace, job, profile)\n"
        'sum by (namespace, job, profile) (job:refreshd_refreshes:rate5m{outcome!="skipped"})'
        " * 300 >= 5\n",
        "15m",
        "warning",
        "Refreshes for profile {{ $labels.profile }} fail",
        f"{WHERE}: {{{{ $value | humanizePercentage }}}} of refresh attempts for profile "
        "{{ $labels.profile }} did not refresh (retry, needs_reauth or quarantined) over "
        "5 minutes, for 15 minutes.",
    ),
    _alert(
        "RefreshdRefreshFailureRatioHigh",
        "job:refreshd_refresh_failure_ratio:rate5m > 0.5\n"
        "and on (namespace, job, profile)\n"
        'sum by (namespace, job, profile) (job:refreshd_refreshes:rate5m{outcome!="skipped"})'
        " * 300 >= 5\n",
        "5m",
        "critical",
        "Most refreshes for profile {{ $labels.profile }} fail",
        f"{WHERE}: {{{{ $value | humanizePercentage }}}} of refresh attempts for profile "
        "{{ $labels.profile }} did not refresh (retry, needs_reauth or quarantined) over "
        "5 minutes, for 5 minutes.",
    ),
    _alert(
        "RefreshdReadyBacklogAgeGrowing",
        "job:refreshd_backlog_oldest_age_seconds:max > 30\n"
        "and\n"
        "deriv(job:refreshd_backlog_oldest_age_seconds:max[5m]) > 0\n",
        "5m",
        "warning",
        "Due credentials wait longer and longer to be refreshed",
        f"{WHERE}: the oldest credential that is due and unclaimed has waited "
        "{{ $value | humanizeDuration }}, and the wait keeps growing.",
    ),
    _alert(
        "RefreshdReadyBacklogAgeGrowing",
        "job:refreshd_backlog_oldest_age_seconds:max > 300",
        "5m",
        "critical",
        "Due credentials have waited over 5 minutes to be refreshed",
        f"{WHERE}: the oldest credential that is due and unclaimed has waited "
        "{{ $value | humanizeDuration }}; tokens will expire before they are refreshed.",
    ),
    _alert(
        "RefreshdLeaseLost",
        _events("refreshd_lease_lost_total", "namespace, job, stage"),
        "0m",
        "critical",
        "refreshd lost a lease (stage {{ $labels.stage }})",
        f"{WHERE}: {{{{ $value | humanize }}}} claim(s) lost their lease at stage "
        "{{ $labels.stage }} in the last 10 minutes (spend: the claim lapsed before the "
        "request was sent; commit: the answer was committed after the lease lapsed). "
        "The spend intent still fenced the refresh token, but leases are lapsing: a "
        "correctness alarm.",
    ),
    _alert(
        "RefreshdCredentialsQuarantined",
        _events(
            'refreshd_refreshes_total{outcome="quarantined"}', "namespace, job, profile, reason"
        ),
        "0m",
        "critical",
        "Credentials of profile {{ $labels.profile }} were quarantined",
        f"{WHERE}: {{{{ $value | humanize }}}} credential(s) of profile {{{{ $labels.profile }}}} "
        "were quarantined in the last 10 minutes (reason {{ $labels.reason }}): a request's "
        "answer was lost and sending the refresh token again could revoke the grant. "
        "They stay stopped until a person acts.",
    ),
    _alert(
        "RefreshdNeedsReauthSpike",
        f"{NEEDS_REAUTH_15M} > 10\n"
        "and on (namespace, job, profile)\n"
        f"{NEEDS_REAUTH_15M}\n  /\n{ATTEMPTS_15M} > 0.01\n",
        "2m",
        "critical",
        "Many credentials of profile {{ $labels.profile }} need re-authorization",
        f"{WHERE}: the provider refused the grant of {{{{ $value | humanize }}}} credential(s) "
        "of profile {{ $labels.profile }} in the last 15 minutes (needs_reauth), over 1 % of "
        "its refreshes. Users must re-authorize each one; a revoked or rotated client "
        "secret turns every credential of the profile into needs_reauth as it comes due.",
    ),
    _alert(
        "RefreshdWorkerAbsent",
        "absent(refreshd_heartbeat_timestamp_seconds)",
        "5m",
        "critical",
        "No refreshd worker is being scraped",
        "Prometheus has scraped no refreshd worker for 5 minutes: nothing may be refreshing "
        "credentials.",
    ),
    _alert(
        "RefreshdRedisUnreachable",
        f"max by ({BY}) (refreshd_redis_up) == 0",
        "2m",
        "critical",
        "No refreshd worker can reach Redis",
        f"{WHERE}: every worker has failed its Redis calls for 2 minutes; nothing is "
        "refreshed and answers already received wait in memory to be committed.",
    ),
    _alert(
        "RefreshdRedisUnreachable",
        "refreshd_redis_up == 0",
        "5m",
        "warning",
        "refreshd worker {{ $labels.instance }} cannot reach Redis",
        f"{WHERE}: worker {{{{ $labels.instance }}}} has failed its Redis calls for 5 minutes "
        "while others may still work.",
    ),
    _alert(
        "RefreshdRedisUnsafe",
        f"max by ({BY}, hazard) "
        '(refreshd_redis_unsafe{accepted="false", hazard=~"eviction|policy_unknown"}) == 1',
        "1m",
        "critical",
        "Redis may evict refreshd's credentials ({{ $labels.hazard }})",
        f"{WHERE}: the Redis server's maxmemory-policy is no longer noeviction (or can no "
        "longer be read), changed while the workers run: under memory pressure Redis deletes "
        "credentials. REFRESHD_UNSAFE_REDIS does not accept it, so a worker restarting now "
        "would refuse to start.",
    ),
    _alert(
        "RefreshdRedisUnsafe",
        f"max by ({BY}, hazard) "
        '(refreshd_redis_unsafe{accepted="false", hazard=~"not_durable|no_waitaof"}) == 1',
        "5m",
        "warning",
        "Redis cannot make refreshd's spends durable ({{ $labels.hazard }})",
        f"{WHERE}: for 5 minutes the Redis server has offered neither an AOF with WAITAOF nor "
        "a connected replica to wait for (hazard {{ $labels.hazard }}): a crash now could make "
        "refreshd send a refresh token twice. REFRESHD_UNSAFE_REDIS does not accept it, so a "
        "worker restarting now would refuse to start.",
    ),
    _alert(
        "RefreshdCommitRejected",
        _events('refreshd_commit_failures_total{reason="stale"}', BY),
        "0m",
        "critical",
        "refreshd could not store tokens a provider issued",
        f"{WHERE}: {{{{ $value | humanize }}}} commit(s) were rejected as stale in the last "
        "10 minutes: the credential's version or spend intent changed while its refresh "
        "was in flight, so the provider's answer was not stored. A correctness alarm.",
    ),
    _alert(
        "RefreshdCommitsNotDurable",
        f'sum by ({BY}) (rate(refreshd_commit_failures_total{{reason="not_durable"}}[5m])) > 0',
        "10m",
        "warning",
        "refreshd commits are not confirmed durable",
        f"{WHERE}: commits keep landing without the fsync (WAITAOF) or replica (WAIT) "
        "confirmation the durability mode asks for ({{ $value | humanize }}/s).",
    ),
    _alert(
        "RefreshdRefreshTokensExpiringSoon",
        # every worker reports the same counts: max, not sum, over instances
        f"sum by ({BY}) (max by ({BY}, horizon) "
        '(refreshd_credentials_by_refresh_horizon{horizon=~"lt_1d|lt_7d"})) > 0',
        "30m",
        "warning",
        "Refresh tokens of active credentials expire within 7 days",
        f"{WHERE}: {{{{ $value | humanize }}}} active credential(s) hold a refresh token that "
        "the provider said expires within 7 days, and refreshing does not renew it (an "
        "absolute lifetime): their users must re-authorize before then.",
    ),
]

GROUPS: list[dict[str, Any]] = [
    {"name": "refreshd.recording", "rules": RECORDING},
    {"name": "refreshd.alerts", "rules": ALERTS},
]

HEADER = (
    "# Generated by dashboards/generate.py: edit that file, then run\n"
    "#   .venv/bin/python dashboards/generate.py\n"
)


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line PromQL, so the generated YAML reads well."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def rules_file() -> str:
    return HEADER + _yaml({"groups": GROUPS})


def prometheus_rule() -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "refreshd", "labels": {"app.kubernetes.io/name": "refreshd"}},
        "spec": {"groups": GROUPS},
    }
    return HEADER + _yaml(doc)


# --------------------------------------------------------------------------
# Dashboard

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", job=~"$job"'
SELP = f'{SEL}, profile=~"$profile"'
RI = "$__rate_interval"


def refreshes(matchers: str = "", fn: str = "rate", window: str = RI) -> str:
    """``rate(refreshd_refreshes_total{<dashboard filters>, matchers}[window])``."""
    extra = f", {matchers}" if matchers else ""
    return f"{fn}(refreshd_refreshes_total{{{SELP}{extra}}}[{window}])"


class _Layout:
    """Places panels left to right in a 24-column grid, rows top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x = self.row_h = 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def _targets(queries: list[tuple[str, str]], **extra: Any) -> list[dict[str, Any]]:
    return [
        {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + n)} | extra
        for n, (expr, legend) in enumerate(queries)
    ]


def timeseries(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    unit: str = "short",
    *,
    stack: bool = False,
    bars: bool = False,
    max_: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "min": 0,
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": 60 if bars else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "calcs": [],
                "displayMode": "list",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str = "short",
    thresholds: list[tuple[float | None, str]] | None = None,
) -> dict[str, Any]:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _targets([(expr, "")]),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "auto",
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "value",
            "wideLayout": True,
            "showPercentChange": False,
            "percentChangeColorMode": "standard",
        },
    }


def heatmap(title: str, description: str, expr: str) -> dict[str, Any]:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _targets([(expr, "{{le}}")], format="heatmap"),
        "options": {
            "calculate": False,
            "yAxis": {"unit": "s"},
            "color": {
                "mode": "scheme",
                "scheme": "Oranges",
                "fill": "dark-orange",
                "exponent": 0.5,
                "reverse": False,
                "steps": 64,
            },
            "cellGap": 1,
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "legend": {"show": True},
            "showValue": "never",
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": False},
        },
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


def bargauge(title: str, description: str, expr: str, legend: str) -> dict[str, Any]:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _targets([(expr, legend)], instant=True),
        "fieldConfig": {
            "defaults": {
                "unit": "short",
                "min": 0,
                "thresholds": {
                    "mode": "absolute",
                    "steps": [{"value": None, "color": "green"}, {"value": 1, "color": "red"}],
                },
            },
            "overrides": [],
        },
        "options": {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "legend": {"calcs": [], "placement": "bottom", "showLegend": False},
            "valueMode": "color",
            "namePlacement": "auto",
            "showUnfilled": True,
            "sizing": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "maxVizHeight": 300,
        },
    }


def _quantiles(metric: str, selector: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[{RI}])))",
            f"p{round(float(q) * 100)}",
        )
        for q in ("0.5", "0.9", "0.99")
    ]


ROWS: list[tuple[str, str]] = [
    ("Throughput", "Is refreshd doing the refresh work, and what do providers answer?"),
    ("Latency", "How long do token endpoints take to answer?"),
    ("Schedule lag", "Do refreshes start on time, well before the tokens expire?"),
    ("Backlog", "How much work is due and waiting, how old is it, and is there capacity?"),
    ("Failures", "What fails, for which profile, and why?"),
    ("Locks and leases", "Are workers contending for credentials or losing leases?"),
    ("Process health", "Is every worker alive, connected to Redis and not draining?"),
]
"""Dashboard rows and the question each answers (the About panel and docs say it)."""


def about() -> dict[str, Any]:
    lines = ["Each row answers one question:", ""]
    lines += [f"- **{title}**: {question}" for title, question in ROWS]
    lines += ["", f"Alerts and what to do about them: [runbooks]({RUNBOOK_BASE})."]
    return {
        "type": "text",
        "title": "About this dashboard",
        "description": "Generated by dashboards/generate.py; edit that file, not this dashboard.",
        "options": {"mode": "markdown", "content": "\n".join(lines)},
    }


def dashboard() -> dict[str, Any]:
    lay = _Layout()
    lay.add(about(), 24, 7)
    lay.row("Throughput")
    lay.add(
        timeseries(
            "Refresh attempts by outcome",
            "Refresh attempts per second by outcome: refreshed, retry (will try again), "
            "needs_reauth (the provider refused the grant), quarantined (stopped rather than "
            "risk a second send), skipped (lost the claim before sending).",
            [
                (
                    f"sum by (outcome) ({refreshes()})",
                    "{{outcome}}",
                )
            ],
            "ops",
            stack=True,
        ),
        12,
    )
    lay.add(
        timeseries(
            "Refreshed per profile",
            "Successful refreshes per second, by provider profile.",
            [
                (
                    f"sum by (profile) ({refreshes(REFRESHED)})",
                    "{{profile}}",
                )
            ],
            "ops",
        ),
        12,
    )
    lay.add(
        timeseries(
            "Claims per second",
            "Credentials claimed by the workers (each claim leads to one refresh attempt).",
            [(f"sum by (instance) (rate(refreshd_claimed_total{{{SEL}}}[{RI}]))", "{{instance}}")],
            "ops",
            stack=True,
        ),
        12,
    )
    lay.add(
        timeseries(
            "Token endpoint answers by status class",
            "Answers from the providers' token endpoints by HTTP status class; 'none' means "
            "no answer (connection failure or timeout).",
            [
                (
                    "sum by (status_class) "
                    f"(rate(refreshd_provider_responses_total{{{SELP}}}[{RI}]))",
                    "{{status_class}}",
                )
            ],
            "reqps",
            stack=True,
        ),
        12,
    )

    lay.row("Latency")
    lay.add(
        timeseries(
            "Refresh duration percentiles",
            "Time from the spend (just before the request) to the provider's answer.",
            _quantiles("refreshd_refresh_duration_seconds", SELP),
            "s",
        ),
        12,
    )
    lay.add(
        timeseries(
            "Refresh duration p99 by profile",
            "99th percentile of the token endpoint's answer time, by profile.",
            [
                (
                    "histogram_quantile(0.99, sum by (profile, le) (rate("
                    f"refreshd_refresh_duration_seconds_bucket{{{SELP}}}[{RI}])))",
                    "{{profile}}",
                )
            ],
            "s",
        ),
        12,
    )

    lay.row("Schedule lag")
    lay.add(
        timeseries(
            "Schedule lag percentiles",
            "Refresh start minus due time. The default lead is at least 60 s (at most half "
            "the lifetime): lag near the lead means tokens expire before their refresh.",
            _quantiles("refreshd_schedule_lag_seconds", SEL),
            "s",
        ),
        8,
    )
    lay.add(
        heatmap(
            "Schedule lag distribution",
            "How many refreshes started how late, per time slice.",
            f"sum by (le) (increase(refreshd_schedule_lag_seconds_bucket{{{SEL}}}[{RI}]))",
        ),
        8,
    )
    lay.add(
        timeseries(
            "Expired before refresh",
            "Refreshes that started after the access token had already expired (should be 0).",
            [
                (
                    f"sum (rate(refreshd_expired_before_refresh_total{{{SEL}}}[{RI}]))",
                    "expired before refresh",
                )
            ],
            "ops",
        ),
        8,
    )

    lay.row("Backlog")
    lay.add(
        stat(
            "Ready backlog",
            "Credentials due now and not claimed (Redis-wide, so the max over workers).",
            f"max(refreshd_backlog{{{SEL}}})",
            thresholds=[(None, "green"), (100, "orange"), (1000, "red")],
        ),
        6,
        5,
    )
    lay.add(
        stat(
            "Oldest ready credential",
            "How long the oldest due, unclaimed credential has waited.",
            f"max(refreshd_backlog_oldest_age_seconds{{{SEL}}})",
            "s",
            thresholds=[(None, "green"), (30, "orange"), (300, "red")],
        ),
        6,
        5,
    )
    lay.add(
        stat(
            "Scheduled credentials",
            "Credentials with a scheduled refresh.",
            f"max(refreshd_scheduled_credentials{{{SEL}}})",
        ),
        6,
        5,
    )
    lay.add(
        stat(
            "In flight",
            "Refreshes claimed and not yet committed, all workers together.",
            f"sum(refreshd_in_flight{{{SEL}}})",
        ),
        6,
        5,
    )
    lay.add(
        timeseries(
            "Ready backlog and its age",
            "Due, unclaimed credentials (left axis) and the wait of the oldest one. A "
            "backlog that does not drain means the workers are saturated (scale out) or "
            "stuck.",
            [
                (f"max(refreshd_backlog{{{SEL}}})", "ready backlog"),
                (f"max(refreshd_backlog_oldest_age_seconds{{{SEL}}})", "oldest age (s)"),
            ],
        ),
        12,
    )
    lay.add(
        timeseries(
            "In flight per worker",
            "Refreshes each worker holds; a worker at REFRESHD_CONCURRENCY is saturated.",
            [(f"sum by (instance) (refreshd_in_flight{{{SEL}}})", "{{instance}}")],
        ),
        12,
    )

    lay.row("Failures")
    lay.add(
        timeseries(
            "Failure ratio by profile",
            "Attempts that did not refresh (retry, needs_reauth, quarantined) over all "
            "attempts that reached a decision (0 when nothing fails).",
            [
                (
                    f"sum by (profile) ({refreshes(FAILED)})\n  /\n"
                    f"sum by (profile) ({refreshes(DECIDED)})\n"
                    f"or\n0 * sum by (profile) ({refreshes(DECIDED)})",
                    "{{profile}}",
                )
            ],
            "percentunit",
            max_=1,
        ),
        12,
    )
    lay.add(
        timeseries(
            "Failures by outcome and reason",
            "Failed attempts per second by outcome and the provider's reason "
            "(invalid_grant, throttled, server_error, timeout, unknown_outcome, ...).",
            [
                (
                    f"sum by (outcome, reason) ({refreshes(FAILED)})",
                    "{{outcome}} {{reason}}",
                )
            ],
            "ops",
            stack=True,
        ),
        12,
    )
    lay.add(
        timeseries(
            "Failures by profile",
            "Failed attempts per second by profile and outcome.",
            [
                (
                    f"sum by (profile, outcome) ({refreshes(FAILED)})",
                    "{{profile}} {{outcome}}",
                )
            ],
            "ops",
            stack=True,
        ),
        12,
    )
    lay.add(
        bargauge(
            "needs_reauth in the last 24 h by profile",
            "Credentials whose grant the provider refused: each needs a person to re-authorize.",
            f"sum by (profile) ({refreshes(NEEDS_REAUTH, 'increase', '24h')})",
            "{{profile}}",
        ),
        6,
    )
    lay.add(
        timeseries(
            "Commit failures by reason",
            "Commits that could not be written: unavailable (Redis away, retried), "
            "not_durable (no fsync/replica confirmation), stale or gone (rejected).",
            [
                (
                    f"sum by (reason) (rate(refreshd_commit_failures_total{{{SEL}}}[{RI}]))",
                    "{{reason}}",
                )
            ],
            "ops",
            stack=True,
        ),
        6,
    )

    lay.row("Locks and leases")
    lay.add(
        timeseries(
            "Lock contention",
            "Due credentials skipped at claim because another worker held them, and the "
            "share of claim attempts that met contention.",
            [
                (f"sum(rate(refreshd_lock_contention_total{{{SEL}}}[{RI}]))", "skipped/s"),
                (
                    f"sum(rate(refreshd_lock_contention_total{{{SEL}}}[{RI}]))\n/\n"
                    f"(sum(rate(refreshd_lock_contention_total{{{SEL}}}[{RI}])) + "
                    f"sum(rate(refreshd_claimed_total{{{SEL}}}[{RI}])))",
                    "contended share",
                ),
            ],
        ),
        8,
    )
    lay.add(
        timeseries(
            "Leases lost (since each worker started)",
            "Claims that lost their lease, by stage (spend: before sending; commit: the "
            "answer landed after the lease). Any step up is a correctness alarm.",
            [
                (
                    f"sum by (stage) (refreshd_lease_lost_total{{{SEL}}})",
                    "{{stage}}",
                )
            ],
        ),
        8,
    )
    lay.add(
        timeseries(
            "Quarantined and skipped (since each worker started)",
            "Credentials quarantined (an answer was lost; resending could revoke the grant) "
            "and attempts skipped because the claim was lost before sending.",
            [
                (
                    "sum by (profile, reason) "
                    f'(refreshd_refreshes_total{{{SELP}, outcome="quarantined"}})',
                    "quarantined {{profile}} {{reason}}",
                ),
                (
                    f'sum by (reason) (refreshd_refreshes_total{{{SELP}, outcome="skipped"}})',
                    "skipped {{reason}}",
                ),
            ],
        ),
        8,
    )

    lay.row("Process health")
    lay.add(
        stat(
            "Workers scraped",
            "Workers Prometheus scrapes successfully.",
            f"sum(up{{{SEL}}})",
            thresholds=[(None, "red"), (1, "orange"), (2, "green")],
        ),
        6,
        5,
    )
    lay.add(
        stat(
            "Workers reaching Redis",
            "Workers whose last Redis call succeeded.",
            f"sum(refreshd_redis_up{{{SEL}}})",
            thresholds=[(None, "red"), (1, "orange"), (2, "green")],
        ),
        6,
        5,
    )
    lay.add(
        stat(
            "Workers draining",
            "Workers draining after SIGTERM (normal during a rollout).",
            f"sum(refreshd_draining{{{SEL}}})",
            thresholds=[(None, "green"), (1, "orange")],
        ),
        6,
        5,
    )
    lay.add(
        stat(
            "Max heartbeat age",
            "Seconds since the slowest worker's gauges loop last beat.",
            f"max(time() - refreshd_heartbeat_timestamp_seconds{{{SEL}}})",
            "s",
            thresholds=[(None, "green"), (10, "orange"), (60, "red")],
        ),
        6,
        5,
    )
    lay.add(
        timeseries(
            "Redis reachable, unsafe, draining per worker",
            "1 = the worker's last Redis call succeeded / the server has a hazard that "
            "REFRESHD_UNSAFE_REDIS does not accept (see the RefreshdRedisUnsafe runbook) / "
            "the worker is draining.",
            [
                (f"refreshd_redis_up{{{SEL}}}", "redis up {{instance}}"),
                (
                    f'max by (hazard) (refreshd_redis_unsafe{{{SEL}, accepted="false"}})',
                    "unsafe {{hazard}}",
                ),
                (f"refreshd_draining{{{SEL}}}", "draining {{instance}}"),
            ],
            max_=1,
        ),
        8,
    )
    lay.add(
        timeseries(
            "Resident memory per worker",
            "Resident set size; compare with the container's memory limit.",
            [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")],
            "bytes",
        ),
        8,
    )
    lay.add(
        timeseries(
            "CPU per worker",
            "CPU seconds per second used by each worker process.",
            [(f"rate(process_cpu_seconds_total{{{SEL}}}[{RI}])", "{{instance}}")],
            "percentunit",
        ),
        8,
    )

    variables = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "includeAll": False,
            "multi": False,
            "options": [],
        },
        *[
            {
                "name": name,
                "label": name,
                "type": "query",
                "datasource": DS,
                "query": query,
                "hide": 0,
                "refresh": 2,
                "regex": "",
                "sort": 1,
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "options": [],
            }
            for name, query in (
                ("namespace", "label_values(refreshd_heartbeat_timestamp_seconds, namespace)"),
                (
                    "job",
                    "label_values(refreshd_heartbeat_timestamp_seconds"
                    '{namespace=~"$namespace"}, job)',
                ),
                ("profile", f"label_values(refreshd_refreshes_total{{{SEL}}}, profile)"),
            )
        ],
    ]
    return {
        "uid": DASHBOARD_UID,
        "title": "refreshd",
        "description": "OAuth token refresh worker: throughput, latency, schedule lag, "
        "backlog, failures, locks and leases, process health. Generated by "
        "dashboards/generate.py.",
        "tags": ["refreshd", "oauth"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [
            {
                "title": "Runbooks",
                "type": "link",
                "url": RUNBOOK_BASE,
                "targetBlank": True,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": False,
                "tooltip": "What to do when a refreshd alert fires",
                "icon": "doc",
                "tags": [],
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables},
        "panels": lay.panels,
    }


def dashboard_file() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


OUTPUTS = {
    RULES_FILE: rules_file,
    PROMETHEUS_RULE_FILE: prometheus_rule,
    DASHBOARD_FILE: dashboard_file,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for path, render in OUTPUTS.items():
        text = render()
        rel = path.relative_to(ROOT)
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale += 1
            print(f"{rel} is out of date; run: .venv/bin/python dashboards/generate.py")
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), str(rel), "generated", lineterm="", n=1
            )
            print("\n".join(list(diff)[:40]))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
