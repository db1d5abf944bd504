"""Reading py-spy's collapsed stacks (``--format raw``): where the worker's
CPU goes, by function (self and inclusive) and by area (library)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["top_functions"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")

_AREAS = {
    "worker": "refreshd (worker/)",
    "httpx_aiohttp": "httpx-aiohttp",
    "httpx": "httpx",
    "aiohttp": "aiohttp",
    "redis": "redis-py",
    "anyio": "anyio",
    "prometheus_client": "prometheus_client",
    "structlog": "structlog",
    "asyncio": "asyncio (event loop, sockets)",
    "selectors.py": "asyncio (event loop, sockets)",
    "json": "json",
    "yarl": "yarl",
    "multidict": "multidict",
    "http": "http.cookiejar (httpx cookies)",
    "urllib": "urllib",
    "hashlib.py": "hashlib",
    "typing.py": "typing",
}


def _area(path: str) -> str:
    head = path.split("/", 1)[0]
    return _AREAS.get(head, "other")


def _short(func: str, path: str) -> str:
    return f"{func} ({path})"


def top_functions(raw: Path, limit: int = 25) -> dict[str, Any]:
    total = 0
    idle = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            if m:
                frames.append((m["func"], m["file"]))
        if not frames:
            continue
        # process-level stacks start with "process <pid>:..."/thread names: skip
        leaf_func, leaf_file = frames[-1]
        if leaf_func.endswith(".select") and leaf_file.startswith("selectors"):
            idle += count
            continue
        total += count
        self_time[_short(leaf_func, leaf_file)] += count
        area = _area(leaf_file)
        areas[area] += count
        for name in {_short(f, p) for f, p in frames}:
            inclusive[name] += count
    if not total:
        return {"samples": 0}

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * v / total, 1)] for name, v in c.most_common(limit)]

    return {
        "samples": total,
        "idle_samples": idle,
        "self_pct": share(self_time),
        "inclusive_pct": share(inclusive),
        "area_self_pct": share(areas),
    }
