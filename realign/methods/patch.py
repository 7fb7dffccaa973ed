"""The one driver of every command that patches an adapter or a checkpoint.

A method describes its run as a `Patch` (what it read, how it scores and selects modules, what
it writes); `run` takes it through the same steps for all of them: plan (load and check every
input by name, before any work), score, select, report, and write atomically into OUT with the
report beside it. A dry run stops before writing. Nothing is written when any step fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..errors import require_output
from ..linalg import LowRank, Matrix
from ..io.output import Checked, atomic_directory, check_target
from ..progress import Progress
from ..report import REPORT_FILE, Report, stage_timings


class Patch:
    """One run of a patching method, after its inputs were loaded and checked (its constructor's
    job). Subclasses implement the four steps; `results` is whatever `score` returns."""

    # set by `run` before scoring: `write` follows `score`, so a method that must read a module's
    # weights again to write it may leave figures of the report to that pass (it fills them in
    # the report's rows) instead of reading the weights twice
    write_follows: bool = False

    def inputs(self) -> list[Path]:
        """Every input path: OUT may not overlap any of them."""
        raise NotImplementedError

    def score(self, progress: Progress | None) -> Any:
        raise NotImplementedError

    def select(self, results: Any) -> set[str]:
        raise NotImplementedError

    def report(self, results: Any, selected: set[str]) -> Report:
        raise NotImplementedError

    def write(self, staging: Path, results: Any, selected: set[str], report: Report) -> None:
        """Fill `staging` (an empty directory that becomes OUT); may add to `report`."""
        raise NotImplementedError

    def deltas(self, results: Any, selected: set[str]) -> dict[str, Matrix]:
        """What `write` would give each module on top of W_aligned, in memory ([out, in], float32,
        low-rank where it is): how `realign repair` evaluates a candidate without writing it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be evaluated in memory")


def write_output(out: Path, force: bool, inputs: list[Path], report: Report, fill: Callable[[Path], None],
                 timings: Callable[[], dict[str, float]], report_name: str = REPORT_FILE, checked: Checked | None = None) -> None:
    """Fill a staging directory with `fill`, put the report (with `timings()` taken last) beside
    it, and rename it to `out`: a failure anywhere leaves nothing at `out`. Every command that
    writes a directory ends here. `checked`: OUT as `check_target` found it before the work; the
    rename replaces only that (nothing, if nothing was there), never what appeared meanwhile."""
    report.output = str(out)
    with atomic_directory(out, force, inputs, checked) as staging:
        fill(staging)
        report.timings = {**report.timings, **timings()}
        (staging / report_name).write_text(report.to_json())


def total_time(started: float) -> Callable[[], dict[str, float]]:
    return lambda: {"total_s": round(time.perf_counter() - started, 4)}


def inspect(plan: Callable[[], Patch]) -> tuple[Report, dict[str, Matrix]]:
    """Plan, score and select like `run`, but write nothing: the report and every module's update."""
    patch = plan()
    results = patch.score(None)
    selected = patch.select(results)
    return patch.report(results, selected), patch.deltas(results, selected)


def module_delta(adapter, module, replaced: dict | None = None) -> LowRank:
    """s B A of one module of `adapter` (with factors from `replaced` where given), float32, the
    scaling folded into B."""
    replaced = replaced or {}
    a = replaced.get(module.key_a, adapter.tensors[module.key_a]).float()
    b = replaced.get(module.key_b, adapter.tensors[module.key_b]).float()
    return LowRank(b * module.scaling, a)


def adapter_deltas(adapter, replaced: dict) -> dict[str, Matrix]:
    """Every module's update of `adapter` with some factors replaced (how a patched copy changes
    the model)."""
    return {module.name: module_delta(adapter, module, replaced) for module in adapter.modules}


def run(plan: Callable[[], Patch], out: str | Path | None, *, dry_run: bool = False, force: bool = False,
        progress: Progress | None = None, checked: Checked | None = None) -> Report:
    """Plan, score, select, report and (unless `dry_run`) write to `out`; see the module docstring.
    `checked`: OUT as a caller checked it before work of its own (repair's search), else checked here."""
    started = time.perf_counter()
    require_output(out, dry_run)
    patch = plan()
    if checked is None and not dry_run:
        checked = check_target(Path(out), force, patch.inputs())
    patch.write_follows = not dry_run
    planned = time.perf_counter()
    results = patch.score(progress)
    selected = patch.select(results)
    computed = time.perf_counter()
    report = patch.report(results, selected)
    if not dry_run:
        write_output(Path(out), force, patch.inputs(), report, lambda staging: patch.write(staging, results, selected, report),
                     lambda: stage_timings(started, planned, computed), checked=checked)
    report.timings = {**report.timings, **stage_timings(started, planned, computed)}
    return report
