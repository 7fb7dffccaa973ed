"""Progress callbacks: long work reports (done, total) and the caller decides how to show it."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int], None]


def ticker(total: int, progress: Progress | None) -> Callable[..., None]:
    """A per-step callback (any arguments ignored) that reports (steps done, `total`)."""
    done = [0]

    def tick(*_) -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return tick
