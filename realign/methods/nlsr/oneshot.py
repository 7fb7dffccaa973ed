"""`realign nlsr` in one go: amplify, regions and patch in memory, with the same result as the
three stages chained through files (tested)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ...calibration.examples import data_path
from ...io.checkpoint import resolve_local
from ...io.device import resolve_device
from ...io.placement import placement
from ...progress import Progress
from ...report import Report
from ..patch import run
from . import math as method
from .amplify import DEFAULT_AMPLIFY, validate_amplify
from .pairs import amplified_tensors, load_pair
from .patch import TransplantPatch, validate_selection
from .regions import RegionSettings, compute_regions, regions_notes


def nlsr(
    base: str,
    aligned_adapter: str,
    adapter: str,
    safety_data: str,
    out: str | Path | None = None,
    *,
    amplify_factor: float = DEFAULT_AMPLIFY,
    sparsity: float = 0.8,
    regions_mode: str = method.ONE_PASS,
    max_response_tokens: int = 256,
    max_samples: int | None = None,
    batch_size: int = 8,
    selection: str = method.ADAPTIVE,
    prune_rate: float = 0.5,
    epsilon: float = 0.2,
    tau: float = 0.1,
    direction: str = method.PAPER,
    seed: int = 42,
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> Report:
    """amplify -> regions -> patch in memory; the same result as the three stages with files.
    `device_map` and `max_memory` spread the base model over devices (docs/dispatch.md)."""
    validate_amplify(amplify_factor)
    settings = RegionSettings(sparsity, regions_mode, max_response_tokens, max_samples, batch_size)
    settings.validate()
    rule = method.Selection(selection, prune_rate, epsilon, tau, direction, seed)
    validate_selection(rule)

    def plan() -> OneShotPatch:
        dev = resolve_device(device)
        placed = placement(device_map, max_memory, device)
        aligned, fine_tuned, pairs = load_pair(aligned_adapter, "aligned adapter", adapter)
        inputs = [resolve_local(base, "base"), aligned.directory, fine_tuned.directory, data_path(safety_data)]
        names = {"base": str(base), "aligned_adapter": str(aligned_adapter), "adapter": str(adapter), "safety_data": str(safety_data)}
        regions = lambda tensors, progress: compute_regions(base, aligned.directory, aligned, tensors, safety_data,  # noqa: E731
                                                            settings, dev, progress, placed)
        return OneShotPatch(regions, fine_tuned, amplified_tensors(aligned, amplify_factor), None, pairs, rule, inputs, names,
                            {"amplify": amplify_factor, **asdict(settings), **asdict(rule), "device": str(dev)})

    return run(plan, out, dry_run=dry_run, force=force, progress=progress)


class OneShotPatch(TransplantPatch):
    """The staged patch with its masks found first, from the reference tensors in memory."""

    command = "nlsr"

    def __init__(self, regions: Callable, *args):
        super().__init__(*args)
        self.regions = regions

    def score(self, progress: Progress | None):
        started = time.perf_counter()
        found = self.regions(self.reference_tensors, progress)
        self.masks = found.masks
        rows, replaced = super().score(progress)
        regions_by_name = {r["name"]: r for r in found.modules}
        for row in rows:
            region = regions_by_name[self.pairs[row["name"]].name]
            row["q"], row["gap"] = region["q"], region["gap"]
        self.summary = {"calibration": found.calibration}
        self.notes = regions_notes(found)
        self.timings = {"regions_s": round(time.perf_counter() - started, 4)}
        return rows, replaced
