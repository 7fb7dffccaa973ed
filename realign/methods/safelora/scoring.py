"""What the adapter and full-checkpoint paths of Safe LoRA share: the settings (defaults, checks),
the selection of modules from their scores, and the report."""

from __future__ import annotations

import math

from ...errors import RealignError
from ...report import Report
from ..patch import Patch
from .math import APPROX, EXACT, ModuleScore, Settings, select

DEFAULT_THRESHOLD = 0.5


def make_settings(threshold: float | None, top_k: int | None, projection: str, rank: int | None) -> Settings:
    """The settings of one run; without a selection rule, the threshold default."""
    if top_k is None and threshold is None:
        threshold = DEFAULT_THRESHOLD
    return Settings(threshold=threshold, top_k=top_k, projection=projection, rank=rank)


def validate(settings: Settings, n_modules: int) -> None:
    if settings.projection not in (APPROX, EXACT):
        raise RealignError(f"--projection must be '{APPROX}' or '{EXACT}', got '{settings.projection}'")
    if settings.projection == EXACT and (settings.rank is None or settings.rank < 1):
        raise RealignError("--projection exact needs --rank K with K >= 1")
    if settings.projection == APPROX and settings.rank is not None:
        raise RealignError("--rank applies only to --projection exact")
    if settings.top_k is not None and settings.threshold is not None:
        raise RealignError("--threshold and --top-k are mutually exclusive")
    if settings.top_k is not None and not 1 <= settings.top_k <= n_modules:
        raise RealignError(f"--top-k must be between 1 and {n_modules} (the adapter's LoRA modules), got {settings.top_k}")
    if settings.threshold is not None and math.isnan(settings.threshold):
        raise RealignError("--threshold must be a number")


def check_scored(scores: list[ModuleScore], settings: Settings, empty: str) -> None:
    """At least one module has a defined similarity (else `empty` is the error), and top-k fits."""
    scored = sum(s.similarity is not None for s in scores)
    if scored == 0:
        raise RealignError(empty)
    if settings.top_k is not None and settings.top_k > scored:
        raise RealignError(f"--top-k {settings.top_k} exceeds the {scored} modules with a defined similarity")


def score_summary(scores: list[ModuleScore], selected: set[str], passthrough: int) -> dict:
    """Counts and min / mean / max similarity; there is at least one defined similarity."""
    scored = [s.similarity for s in scores if s.similarity is not None]
    return {
        "modules": len(scores),
        "scored": len(scored),
        "projected": len(selected),
        "skipped": len(scores) - len(scored),
        "passthrough_tensors": passthrough,
        "min_similarity": min(scored),
        "mean_similarity": sum(scored) / len(scored),
        "max_similarity": max(scored),
    }


def module_row(name: str, shape, rank: int | None, scaling: float | None, score: ModuleScore, selected: set[str]) -> dict:
    return {"name": name, "shape": list(shape), "rank": rank, "scaling": scaling, "similarity": score.similarity,
            "projected": name in selected, "alignment_norm": score.alignment_norm, "skipped": score.skip_reason}


class SafeLoraPatch(Patch):
    """Selection and report of both paths; subclasses set `settings`, `device`, `names`
    (input names for the report) and `kind` (of the alignment source) and score and write."""

    settings: Settings
    notes: tuple[str, ...] = ()

    def select(self, scores: list[ModuleScore]) -> set[str]:
        return select(scores, self.settings)

    def safelora_report(self, scores: list[ModuleScore], selected: set[str], rows: list[dict], passthrough: dict[str, str]) -> Report:
        s = self.settings
        notes = list(self.notes)
        if s.projection == APPROX:
            notes.append("C = V V^T / ||V||_F as in the paper and reference code; it is not an idempotent projector")
        return Report(
            command="safelora",
            inputs={**self.names, "aligned_kind": self.kind},
            settings={"selection": s.selection, "threshold": s.threshold, "top_k": s.top_k, "projection": s.projection,
                      "rank": s.rank, "device": str(self.device)},
            modules=rows,
            passthrough=[{"tensor": k, "reason": r} for k, r in passthrough.items()],
            summary=score_summary(scores, selected, len(passthrough)),
            notes=notes,
        )
