"""`python -m bench.client_read` keeps working (its figures are not checked:
they belong to the machine, see README "Consuming tokens")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_client_read_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.client_read", "--reads", "400", "--rounds", "2",
         "--concurrency", "4", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reads"] == 400
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert len(result["p99_ms_per_round"]) == 2
    assert result["client_cpu_us_per_read"] > 0
    assert result["concurrent_reads_per_s"] > 0
