"""End to end: a real Prometheus scrapes a real worker during a short refresh run.

    .venv/bin/python deploy/ci/e2e_prometheus.py

On 127.0.0.1 only, everything started here and stopped at the end:

1. a private Valkey/Redis server (tests/redis_server.py), the strict fake token
   endpoint (worker.fakeprovider) with 10 s tokens, and ~200 credentials seeded
   through the normal import path;
2. ``refreshd run`` as a subprocess, exactly as in the container;
3. ``prometheus`` (1 s scrape and rule evaluation) with
   dashboards/prometheus/refreshd.rules.yml.

Then it checks that:

* every recording rule returns data through Prometheus' HTTP API, and every
  rule evaluates without error; no alert fires during the healthy run;
* ``promtool check metrics`` passes on the worker's /metrics;
* every metric name used by a rule or a dashboard query (or variable) is one
  the worker exports (families from /metrics, with _bucket/_sum/_count for
  histograms) or that Prometheus adds to a scrape (``up``), or a recording
  rule's name;
* every dashboard query evaluates without error on the live Prometheus;
* the provider saw no refresh token twice, and SIGTERM drains the worker to
  exit code 0.

Exits non-zero on any failure, printing the worker's and Prometheus' logs.
"""

# ruff: noqa: S603, S607 - runs fixed local tools (the worker, prometheus, promtool)

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness import seed  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402
from worker.app import open_store  # noqa: E402
from worker.fakeprovider import FakeProvider, FakeProviderConfig  # noqa: E402
from worker.settings import Settings  # noqa: E402

RULES = ROOT / "dashboards" / "prometheus" / "refreshd.rules.yml"
DASHBOARD = ROOT / "dashboards" / "grafana" / "refreshd.json"

CREDENTIALS = 200
LIFETIME_S = 10
DEADLINE_S = 150.0
RULES_WITHIN_S = 60.0
DRAIN_GRACE_S = 5

#: Grafana's variables, replaced by sample values to run a query by hand.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1s",
    "$__range": "1h",
    "$namespace": ".*",
    "$job": ".*",
    "$profile": ".*",
}

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[e2e {time.monotonic() - _T0:5.1f}s] {message}", flush=True)


class Failed(Exception):
    pass


def expect(ok: object, message: str) -> None:
    if not ok:
        raise Failed(message)


def spawn(argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
    )


# ------------------------------------------------------------ PromQL names

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names a PromQL expression reads.

    Strings, label matchers, ranges and grouping clauses are removed; what is
    left are function names (followed by '('), keywords, numbers, durations and
    metric names. ``__name__`` matchers would hide a name, so they are refused.
    """
    if "__name__" in expr:
        raise Failed(f"use metric names, not __name__ matchers, in: {expr}")
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics page can produce, families without
    samples included (a labelled counter shows only # TYPE until first use)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            elif kind == "summary":
                names |= {f"{name}_count", f"{name}_sum"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            found = _IDENT.match(line)
            if found:
                names.add(found.group(0))
    return names


def queries_in_use() -> list[tuple[str, str]]:
    """(where, expr) for every rule, dashboard query and variable query."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"rule {rule.get('record') or rule.get('alert')}", rule["expr"]))
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"dashboard panel {panel['title']!r}", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            found = re.match(r"label_values\((.*),\s*\w+\)$", var["query"])
            if not found:
                raise Failed(f"dashboard variable {var['name']}: not label_values(...)")
            out.append((f"dashboard variable ${var['name']}", found.group(1)))
    return out


def recording_rules() -> list[str]:
    names = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        names += [r["record"] for r in group["rules"] if "record" in r]
    return list(dict.fromkeys(names))


def grafana_to_promql(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


# ------------------------------------------------------------------ helpers


async def wait_until(what: str, check: Any, within: float, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"{what}: the process exited with {proc.returncode}")
        try:
            last = await check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last is True or (last and not isinstance(last, (str, list, set))):
                return last
        await anyio.sleep(0.5)
    raise Failed(f"timed out after {within:g}s waiting for {what} (last: {last})")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def stop(proc: subprocess.Popen[bytes] | None, sig: int, within: float) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------- run


async def run(tmp: Path) -> None:
    worker: subprocess.Popen[bytes] | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    worker_log = tmp / "worker.log"
    prom_log = tmp / "prometheus.log"
    redis = RedisServer(tmp / "redis")
    try:
        redis.start()
        say(f"redis on {redis.url.rsplit('@', 1)[-1]}")
        config = FakeProviderConfig(lifetime_s=LIFETIME_S)
        async with FakeProvider(config) as provider, httpx.AsyncClient(timeout=5) as http:
            async with open_store(Settings(redis_url=redis.url, http_port=0)) as store:
                await seed(store, provider, CREDENTIALS, expires_in=lambda n: 4 + n % 7)
            say(f"seeded {CREDENTIALS} credentials, token endpoint {provider.url}")

            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
            env |= {
                "REFRESHD_REDIS_URL": redis.url,
                "REFRESHD_HTTP_HOST": "127.0.0.1",
                "REFRESHD_HTTP_PORT": str(port),
                "REFRESHD_WORKER_ID": "e2e-worker",
                "REFRESHD_CONCURRENCY": "64",
                "REFRESHD_DRAIN_GRACE_SECONDS": str(DRAIN_GRACE_S),
                "REFRESHD_LOG_LEVEL": "warning",
                "REFRESHD_DATA_DIR": str(tmp / "data"),
            }
            worker = spawn([sys.executable, "-m", "worker", "run"], worker_log, cwd=ROOT, env=env)
            base = f"http://127.0.0.1:{port}"

            async def ready() -> bool:
                return (await http.get(f"{base}/readyz")).status_code == 200

            await wait_until("the worker's /readyz", ready, 30, worker)
            say(f"worker ready on {base} (pid {worker.pid})")

            prom_port = free_port()
            prom_config = tmp / "prometheus.yml"
            prom_config.write_text(
                yaml.safe_dump(
                    {
                        "global": {
                            "scrape_interval": "1s",
                            "scrape_timeout": "1s",
                            "evaluation_interval": "1s",
                        },
                        "rule_files": [str(RULES)],
                        "scrape_configs": [
                            {
                                "job_name": "refreshd",
                                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                            }
                        ],
                    }
                )
            )
            prometheus = spawn(
                [
                    "prometheus",
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                prom_log,
                cwd=tmp,
            )
            api = f"http://127.0.0.1:{prom_port}/api/v1"

            async def prom_ready() -> bool:
                return (await http.get(f"http://127.0.0.1:{prom_port}/-/ready")).status_code == 200

            await wait_until("Prometheus /-/ready", prom_ready, 30, prometheus)
            say(f"prometheus ready on 127.0.0.1:{prom_port}")

            async def query(expr: str) -> list[Any]:
                answer = (await http.get(f"{api}/query", params={"query": expr})).json()
                expect(
                    answer.get("status") == "success",
                    f"query failed: {expr}\n  {answer.get('error')}",
                )
                result: list[Any] = answer["data"]["result"]
                return result

            # 1. every name used is exported (or added by Prometheus, or recorded);
            #    checked first, so that a missing metric fails fast and by name
            records = recording_rules()

            async def scraped() -> bool:
                return bool(await query("up"))

            await wait_until("Prometheus' first scrape", scraped, 30, prometheus)
            exposition = (await http.get(f"{base}/metrics")).text
            exported = exported_names(exposition)
            seen = set((await http.get(f"{api}/label/__name__/values")).json()["data"])
            allowed = exported | seen | set(records)
            used: dict[str, set[str]] = {}
            for where, expr in queries_in_use():
                for name in metric_names(expr):
                    used.setdefault(name, set()).add(where)
            unknown = {n: w for n, w in used.items() if n not in allowed}
            expect(
                not unknown,
                "metrics used by rules or dashboard that the worker does not export:\n"
                + "\n".join(f"  {n}: used by {', '.join(sorted(w))}" for n, w in unknown.items()),
            )
            families = re.findall(r"^# TYPE (refreshd_\w+) (\w+)$", exposition, re.M)
            unused = sorted(
                name for name, kind in families
                if kind != "gauge" or not name.endswith("_created")
                if not {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} & used.keys()
            )  # fmt: skip
            say(
                f"metric names: {len(used)} used, all exported or recorded "
                f"(worker metrics on no rule or panel: {unused or 'none'})"
            )

            # 2. every recording rule returns data
            pending = set(records)

            async def rules_have_data() -> bool | list[str]:
                for name in sorted(pending):
                    if await query(name):
                        pending.discard(name)
                return True if not pending else sorted(pending)

            await wait_until(
                f"data from all {len(records)} recording rules", rules_have_data,
                RULES_WITHIN_S, prometheus,
            )  # fmt: skip
            say(f"all {len(records)} recording rules return data")
            for name in records:
                sample = (await query(name))[0]
                labels = {k: v for k, v in sample["metric"].items() if k != "__name__"}
                say(f"  {name}{labels} = {sample['value'][1]}")

            # 3. every rule evaluates cleanly; nothing fires in a healthy run
            groups = (await http.get(f"{api}/rules")).json()["data"]["groups"]
            for group in groups:
                for rule in group["rules"]:
                    expect(
                        rule.get("health") == "ok",
                        f"rule {rule['name']} health {rule.get('health')}: {rule.get('lastError')}",
                    )
            alerts = (await http.get(f"{api}/alerts")).json()["data"]["alerts"]
            firing = [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"]
            expect(not firing, f"alerts fire during a healthy run: {firing}")
            waiting = sorted({a["labels"]["alertname"] for a in alerts})
            say(f"all rules healthy; no alert firing (pending: {waiting or 'none'})")

            # 4. promtool check metrics on a scrape with samples
            exposition = (await http.get(f"{base}/metrics")).text
            (tmp / "metrics.txt").write_text(exposition)
            lint = await anyio.to_thread.run_sync(promtool_check_metrics, exposition)
            expect(lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}")
            say("promtool check metrics: ok")

            # 5. every dashboard query evaluates on the live server
            board = json.loads(DASHBOARD.read_text())
            empty = []
            count = 0
            for panel in board["panels"]:
                for target in panel.get("targets", []):
                    count += 1
                    if not await query(grafana_to_promql(target["expr"])):
                        empty.append(f"{panel['title']} [{target['refId']}]")
            say(
                f"dashboard: {count} queries evaluate; {count - len(empty)} returned data "
                f"(empty in a healthy run: {empty or 'none'})"
            )

            # 6. the worker did real work, never reused a token, drains on SIGTERM
            expect(provider.stats.refreshed, "the provider saw no refresh")
            expect(
                not provider.stats.reuse_events,
                f"refresh token reuse: {provider.stats.reuse_events[:3]}",
            )
            rss = peak_rss_mib(worker.pid)
            code = stop(worker, signal.SIGTERM, DRAIN_GRACE_S + 35)
            expect(code == 0, f"worker exit code after SIGTERM: {code} (want 0)")
            say(
                f"provider: {provider.stats.refreshed} refreshes, no reuse; worker peak RSS "
                f"{rss:.0f} MiB; SIGTERM -> exit 0"
                if rss is not None
                else f"provider: {provider.stats.refreshed} refreshes; SIGTERM -> exit 0"
            )
    except BaseException:
        print(f"--- worker log (tail)\n{tail(worker_log)}", file=sys.stderr)
        print(f"--- prometheus log (tail)\n{tail(prom_log)}", file=sys.stderr)
        raise
    finally:
        stop(worker, signal.SIGKILL, 10)
        stop(prometheus, signal.SIGTERM, 10)
        redis.stop()


def main() -> int:
    if not shutil.which("prometheus") or not shutil.which("promtool"):
        print("e2e: prometheus/promtool not on PATH (apt-get install prometheus)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="refreshd-e2e-"))

    async def bounded() -> None:
        with anyio.fail_after(DEADLINE_S):
            await run(tmp)

    try:
        anyio.run(bounded)
    except Failed as exc:
        print(f"e2e FAILED: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"e2e FAILED: no result within {DEADLINE_S:g}s", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say("e2e: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
