"""README "Scale": the sizing table is computed from the benchmark's results
(bench.scale), and the README shows exactly what the results give."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import (
    BEGIN,
    END,
    Assumptions,
    Costs,
    block,
    current_block,
    plan,
    readme_block,
    refresh_interval_s,
)
from worker.scheduling import Schedule
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

COSTS = Costs(
    bytes_per_credential=1000.0,
    bytes_per_event=500.0,
    redis_cpu_ms=0.1,
    worker_cpu_ms=0.4,
    source="test",
)


def test_the_readme_table_is_what_the_results_give() -> None:
    """Rerun ``python -m bench.scale --write`` after a benchmark run."""
    assert current_block(README) == readme_block(), (
        "README's Scale table is out of date: run python -m bench.scale --write"
    )


def test_the_readme_block_has_its_markers_once() -> None:
    assert README.count(BEGIN) == README.count(END) == 1


def test_a_one_hour_token_is_refreshed_every_47_minutes_on_average() -> None:
    # lead = 20 % of 3600 s = 720 s; jitter uniform in [0, 72 s]: mean 36 s
    assert refresh_interval_s(3600, Schedule()) == pytest.approx(3600 - 720 - 36)
    # a short token: lead at least 60 s, at most half the lifetime
    assert refresh_interval_s(100, Schedule()) == pytest.approx(100 - 50 - 2.5)


def test_the_plan_follows_the_costs() -> None:
    a = Assumptions()
    p = plan(10_000_000, COSTS, a)
    rate = 10_000_000 / 2844
    assert p.refreshes_per_s == pytest.approx(rate)
    # the event log's length cap binds: a day of events is far more than 1 M
    assert p.retained_events == Settings().event_log_max_length
    assert p.memory_bytes == pytest.approx(10_000_000 * 1000 + 1_000_000 * 500)
    assert p.shards_for_memory == math.ceil(10.5e9 / 12e9) == 1
    assert p.redis_cores == pytest.approx(rate * 0.1 / 1000)
    assert p.shards_for_cpu == math.ceil(rate * 0.1 / 1000 / 0.5) == 1
    assert p.shards == 1
    assert p.choose == "Sentinel"
    assert p.workers == math.ceil(rate * 0.4 / 1000 / 0.5) == 3


def test_cpu_or_memory_past_one_node_chooses_the_cluster() -> None:
    cpu_bound = plan(10_000_000, Costs(1.0, 1.0, 1.0, 0.1, "test"), Assumptions())
    assert (cpu_bound.shards_for_memory, cpu_bound.shards_for_cpu) == (1, 8)
    assert cpu_bound.choose == "Cluster"
    memory_bound = plan(100_000_000, COSTS, Assumptions())
    assert memory_bound.shards_for_memory == math.ceil(100.5e9 / 12e9) == 9
    assert memory_bound.shards == 9
    assert memory_bound.choose == "Cluster"
    # at least 8 partitions per primary (README "Configuration"), never fewer than the default
    assert memory_bound.partitions(Assumptions()) == 72
    assert plan(1000, COSTS, Assumptions()).partitions(Assumptions()) == 16


def test_the_settings_move_the_plan() -> None:
    """The event log off keeps no events; a higher concurrency needs fewer
    processes for the refreshes in flight; at least two workers always."""
    off = Assumptions(settings=Settings(event_log=False))
    assert plan(1_000_000, COSTS, off).memory_bytes == pytest.approx(1e9)
    slow = Assumptions(provider_latency_s=10.0, settings=Settings(concurrency=100))
    p = plan(1_000_000, Costs(1.0, 1.0, 0.01, 0.001, "test"), slow)
    assert p.workers == math.ceil(1_000_000 / 2844 * 10 / 100) == 36
    assert plan(1000, COSTS, Assumptions()).workers == 2


def test_the_costs_come_from_the_cluster_run_when_there_is_one() -> None:
    full = {
        "runs": {
            "catch_up_1p": {"cpu_ms_per_refresh": {"redis": 0.2, "worker": 0.3}},
            "memory": {"refreshd": {"bytes_per_credential": 1100.0}},
            "eventlog_ab": {"redis_bytes_per_retained_event": 900.0},
        }
    }
    single = Costs.from_results(full)
    assert (single.redis_cpu_ms, single.worker_cpu_ms) == (0.2, 0.3)
    shard = {"cpu_medians": {"redis_per_shard": 0.25}, "shards": 3}
    cluster = {"runs": {"cluster": {"cluster": shard}}}
    costs = Costs.from_results(full, cluster)
    assert costs.redis_cpu_ms == 0.25
    assert "3-shard cluster" in costs.source
    assert "0.250 ms" in block(costs, Assumptions())


def test_python_m_bench_scale_prints_the_block() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale"], cwd=ROOT, capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == readme_block()


def test_the_readme_cluster_rows_are_the_cluster_run() -> None:
    """README "Benchmark" shows docs/bench-cluster.json's figures, as
    bench.report.cluster_table renders them."""
    from bench.report import cluster_table

    results = json.loads((ROOT / "docs" / "bench-cluster.json").read_text())
    assert cluster_table(results) in README
