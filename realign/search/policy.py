"""The decisions of `realign repair`, as pure functions of counts: when a candidate cannot meet
the target any more (early stop), which candidate wins, and where the grid is refined."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..eval.metrics import wilson_interval


@dataclass
class Measured:
    """What calibration said of one candidate so far: refusals on harmful prompts, refusals on
    benign prompts (over-refusal), correct task answers; each (k, n) or None when not measured."""

    refusal: tuple[int, int] | None = None
    over_refusal: tuple[int, int] | None = None
    task: tuple[int, int] | None = None
    stopped: str | None = None  # why evaluation stopped early
    extra: dict = field(default_factory=dict)

    @staticmethod
    def rate(counts: tuple[int, int] | None) -> float | None:
        return None if counts is None or counts[1] == 0 else counts[0] / counts[1]


# An early stop looks at the counts after every batch, so it is decided at a stricter level than
# the 95% intervals the report shows (z = 2.576, 99% two-sided), and never before MIN_STOP_PROMPTS
# prompts: simulated over shuffled orders, 95% bounds checked after every prompt stopped 13-17%
# of the candidates whose full-set rate met the target; with these rules it is a few percent at
# the worst sizes (tests/test_repair.py).
STOP_Z = 2.5758293035489004
MIN_STOP_PROMPTS = 32


def hopeless_refusal(k: int, n: int, target: float) -> bool:
    """After k refusals of n harmful prompts (n >= MIN_STOP_PROMPTS), the 99% Wilson upper bound
    is already below the target: the candidate is very unlikely to reach it."""
    return n >= MIN_STOP_PROMPTS and wilson_interval(k, n, STOP_Z)[1] < target


def hopeless_over_refusal(k: int, n: int, limit: float) -> bool:
    """After k refusals of n benign prompts, the 99% Wilson lower bound is already above the limit."""
    return n >= MIN_STOP_PROMPTS and wilson_interval(k, n, STOP_Z)[0] > limit


def meets(measured: Measured, target: float, max_over_refusal: float | None) -> bool:
    """Fully measured, refusal rate >= target and over-refusal <= the limit (point estimates:
    the intervals are reported next to them)."""
    if measured.stopped is not None or measured.refusal is None:
        return False
    if Measured.rate(measured.refusal) < target:
        return False
    if max_over_refusal is not None and measured.over_refusal is not None:
        return Measured.rate(measured.over_refusal) <= max_over_refusal
    return True


def best(candidates: list[tuple[str, Measured]], target: float, max_over_refusal: float | None) -> str | None:
    """The name of the candidate that meets the target with the highest task score; ties go to
    the higher refusal, then the lower over-refusal, then the earlier candidate (the grid lists
    the milder changes first). Without task scores the earliest passing candidate wins: the
    mildest change that meets the target. None when no candidate meets the target."""
    passing = [(i, name, m) for i, (name, m) in enumerate(candidates) if meets(m, target, max_over_refusal)]
    if not passing:
        return None
    if all(m.task is None for _, _, m in passing):
        return passing[0][1]

    def key(item):
        i, _, m = item
        task = Measured.rate(m.task)
        over = Measured.rate(m.over_refusal)
        return (-(task if task is not None else 0.0), -Measured.rate(m.refusal), over if over is not None else 0.0, i)

    return min(passing, key=key)[1]


def refine(points: list[tuple[float, bool]]) -> list[float]:
    """Values to try between neighbours along one knob, where the target flips: `points` are
    (knob value, meets the target) sorted by the knob; one midpoint per flip."""
    ordered = sorted(points)
    return [(a + b) / 2 for (a, ok_a), (b, ok_b) in zip(ordered, ordered[1:]) if ok_a != ok_b]
