"""``with`` support for the test helpers that run a process: start on entry, stop on exit."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["StartStop"]


class StartStop:
    """Mixin for a helper with ``start()`` and ``stop()`` (a server, a
    cluster, a peer): ``with Helper(...) as h`` starts it and stops it
    however the block ends, so a failing test never leaves a process
    behind. One definition for every such helper, so they cannot drift."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
