"""`realign safemerge`: per module, Safe LoRA's similarity of the fine-tuned update T against
S = W_aligned - W_base; below tau the module becomes task_weight * T + safety_weight * S, elsewhere
it keeps T. S is the aligned adapter's LoRA when ALIGNED is one (the output is then an exact
LoRA), dense from two checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ...errors import RealignError
from ...io.adapter import LoraModule
from ...linalg import LowRank, Matrix
from ...progress import Progress
from ...report import Report
from ..merging import Combination, MergePatch, check_output_options
from ..patch import run
from ..resta.run import check_weight
from ..safelora.math import score_module
from .math import DEFAULT_SAFETY_WEIGHT, DEFAULT_TASK_WEIGHT, DEFAULT_TAU, merges


class SafeMergePatch(MergePatch):
    command = "safemerge"

    def __init__(self, base: str, aligned: str, adapter: str, *, tau: float, task_weight: float, safety_weight: float,
                 as_adapter: bool, adapter_rank: int | None):
        super().__init__(base, aligned, adapter, as_adapter, adapter_rank)
        self.tau, self.task_weight, self.safety_weight = tau, task_weight, safety_weight
        self.settings = {"tau": tau, "task_weight": task_weight, "safety_weight": safety_weight}
        self.notes.append("similarity = Safe LoRA's cos(dW, C dW) with C = S S^T / ||S||_F, S = W_aligned - W_base; "
                          "a module is merged when it is below tau")
        self.check_writable()

    def combine(self, module: LoraModule, task: LowRank, safety: Matrix | None) -> tuple[Combination, dict]:
        cpu = torch.device("cpu")
        a, b = self.adapter.tensors[module.key_a], self.adapter.tensors[module.key_b]
        projected, norm = self.alignment.approx(module.name, b, cpu)
        score = score_module(module.name, a, b, projected, norm)
        merged = merges(score.similarity, self.tau)
        combo = Combination(module.name, (module.d_out, module.d_in))
        combo.add(self.task_weight if merged else 1.0, task)
        if merged:
            combo.add(self.safety_weight, safety)
        return combo, {"similarity": score.similarity, "merged": merged, "skipped": score.skip_reason}

    def select(self, results) -> set[str]:
        return {row["name"] for _, row in results if row["merged"]}

    def report(self, results, selected: set[str]) -> Report:
        report = super().report(results, selected)
        scored = [row["similarity"] for _, row in results if row["similarity"] is not None]
        report.summary.update(merged=len(selected), scored=len(scored),
                              min_similarity=min(scored) if scored else None, max_similarity=max(scored) if scored else None)
        return report


def safemerge(
    base: str,
    aligned: str,
    adapter: str,
    out: str | Path | None = None,
    *,
    tau: float = DEFAULT_TAU,
    task_weight: float = DEFAULT_TASK_WEIGHT,
    safety_weight: float = DEFAULT_SAFETY_WEIGHT,
    as_adapter: bool = False,
    adapter_rank: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """SafeMERGE: modules whose update's Safe LoRA similarity to S = W_aligned - W_base is below
    `tau` become task_weight * T + safety_weight * S; the others keep T. Written as an exact LoRA
    when ALIGNED is an adapter on BASE, else as a patched aligned checkpoint or (with
    `as_adapter`) a rank-`adapter_rank` truncated-SVD adapter."""
    return run(plan_safemerge(base, aligned, adapter, tau=tau, task_weight=task_weight, safety_weight=safety_weight,
                              as_adapter=as_adapter, adapter_rank=adapter_rank),
               out, dry_run=dry_run, force=force, progress=progress)


def plan_safemerge(base: str, aligned: str, adapter: str, *, tau: float = DEFAULT_TAU, task_weight: float = DEFAULT_TASK_WEIGHT,
                   safety_weight: float = DEFAULT_SAFETY_WEIGHT, as_adapter: bool = False,
                   adapter_rank: int | None = None) -> Callable[[], SafeMergePatch]:
    """The run of `safemerge`, its settings checked, for the patch driver (or `inspect`)."""
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and -1.0 <= tau <= 1.0):
        raise RealignError(f"--tau must be a similarity in [-1, 1], got {tau}")
    check_weight("--task-weight", task_weight)
    check_weight("--safety-weight", safety_weight)
    check_output_options(as_adapter, adapter_rank)
    return lambda: SafeMergePatch(base, aligned, adapter, tau=float(tau), task_weight=float(task_weight),
                                  safety_weight=float(safety_weight), as_adapter=as_adapter, adapter_rank=adapter_rank)
