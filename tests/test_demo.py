"""`refreshd demo` with its consumer: a separate process on the client
library, SIGKILLed and restarted once, must receive one event per commit,
and the demo fails when it does not."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import run_demo
from worker import demo
from worker.democonsumer import ConsumerProcess, resume_point
from worker.fakeprovider import FakeProvider

CURSOR = "1:0,5-0"


def test_the_demo_runs_a_consumer_that_survives_a_kill_and_misses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    summary, stderr = run_demo(redis_url, tmp_path)
    assert summary["refresh_tokens_sent_twice"] == 0
    assert summary["consumer_kills"] == 1
    # every committed version seen once, across the kill
    assert summary["refreshed"] > 60
    assert summary["commits"] == summary["events_received"] >= summary["refreshed"] - 5
    assert summary["events_missing"] == summary["events_duplicated"] == 0
    # get(id, min_ttl=...) from the consumer process, served through the workers
    assert summary["min_ttl_reads"] + summary["min_ttl_read_errors"] == demo.MIN_TTL_READS
    assert summary["min_ttl_reads"] >= 1
    assert "killed and restarted 1x" in stderr
    # the README's demo output shows the same summary fields
    assert list(readme_summary()) == list(summary)


def readme_summary() -> dict[str, object]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```\n[ 30.", 1)[1].split("```", 1)[0]
    summary: dict[str, object] = json.loads(block[block.index("{") : block.rindex("}") + 1])
    assert summary["events_received"] == summary["commits"]
    return summary


def test_a_torn_last_line_is_cut_and_its_event_read_again(tmp_path: Path) -> None:
    out = tmp_path / "events.txt"
    assert resume_point(out) == "start"
    out.write_bytes(f"c1 1 token.refreshed {CURSOR}\nc2 1 token.ref".encode())
    assert resume_point(out) == CURSOR
    assert out.read_text() == f"c1 1 token.refreshed {CURSOR}\n"


def test_the_demo_fails_when_the_consumer_missed_a_commit(tmp_path: Path) -> None:
    consumer = ConsumerProcess(tmp_path, {}, credentials=2, min_ttl=1, reads=0, spread=1)
    consumer.events.write_text(
        f"demo-000000 1 token.refreshed {CURSOR}\n"
        f"demo-000000 2 token.refreshed {CURSOR}\n"
        f"demo-000001 2 token.refreshed {CURSOR}\n"  # version 1 of demo-000001 never came
    )
    report = consumer.report({"demo-000000": 2, "demo-000001": 2})
    assert report["commits"] == 4
    assert report["events_received"] == 3
    assert report["events_missing"] == 1
    tally = demo._Tally(events={"token.refreshed": 4}, consumer=report)
    provider = FakeProvider()
    assert demo._report(demo.DemoOptions(credentials=2), 4.0, tally, provider) == 1
    # the same run with the missing event delivered passes
    with consumer.events.open("a") as f:
        f.write(f"demo-000001 1 token.refreshed {CURSOR}\n")
    tally.consumer = consumer.report({"demo-000000": 2, "demo-000001": 2})
    assert tally.consumer["events_received"] == tally.consumer["commits"] == 4
    assert demo._report(demo.DemoOptions(credentials=2), 4.0, tally, provider) == 0
