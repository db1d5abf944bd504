"""`python -m worker` is the same as the `refreshd` console script."""

from __future__ import annotations

from worker.cli import main

raise SystemExit(main())
