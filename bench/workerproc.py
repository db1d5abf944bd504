"""`refreshd run`, with the benchmark's passive probe attached.

Exactly the worker `python -m worker run` starts (settings from the
REFRESHD_* environment, `worker.app.run_worker`), plus two hooks that do
not change its behaviour: a Redis round-trip counter and the Refresher's
documented ``on_lag`` callback, both written to ``$BENCH_DUMP`` on SIGUSR1.
"""

from __future__ import annotations

import os
import sys

from bench.probe import Probe


def main() -> int:
    probe = Probe(os.environ.pop("BENCH_DUMP", None))
    probe.count_redis_round_trips()

    import worker.app
    from worker.cli import main as refreshd_main

    build = worker.app.build_refresher

    def build_refresher(*args, **kwargs):  # type: ignore[no-untyped-def]
        refresher = build(*args, **kwargs)
        refresher.on_lag = probe.on_lag
        return refresher

    worker.app.build_refresher = build_refresher
    probe.install_signal()
    return refreshd_main(["run"])


if __name__ == "__main__":
    sys.exit(main())
