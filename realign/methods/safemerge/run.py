"""`realign safemerge`: per module, Safe LoRA's similarity of the fine-tuned update T (an
adapter's s B A, or W_finetuned - W_aligned of a full fine-tune) against S = W_aligned - W_base;
below tau the module becomes task_weight * T + safety_weight * S, elsewhere it keeps T. S is the
aligned adapter's LoRA when ALIGNED is one (the output is then an exact LoRA for an adapter), dense
from two checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ...errors import RealignError
from ...linalg import Matrix
from ...progress import Progress
from ...report import Report
from ..merged_output import Combination
from ..merging import MergeModule, MergePatch, check_output_options
from ..merging_full import check_one_finetune, open_side
from ..patch import run
from ..resta.run import check_weight
from .math import DEFAULT_SAFETY_WEIGHT, DEFAULT_TASK_WEIGHT, DEFAULT_TAU, merges


class SafeMergePatch(MergePatch):
    command = "safemerge"

    def __init__(self, side, *, tau: float, task_weight: float, safety_weight: float, as_adapter: bool, adapter_rank: int | None):
        super().__init__(side, as_adapter, adapter_rank)
        self.tau, self.task_weight, self.safety_weight = tau, task_weight, safety_weight
        self.settings = {"tau": tau, "task_weight": task_weight, "safety_weight": safety_weight}
        self.notes.append("similarity = Safe LoRA's cos(dW, C dW) with C = S S^T / ||S||_F, S = W_aligned - W_base; "
                          "a module is merged when it is below tau")
        self.check_writable()
        # each module's (similarity, skip reason), measured while scoring: a dense T' is built
        # again when written, and the decision must not cost a second read of both weights
        self._scores: dict[str, tuple[float | None, str | None]] = {}

    def combine(self, module: MergeModule, task: Matrix, safety, writing: bool) -> tuple[Combination, dict]:
        if module.name not in self._scores:
            self._scores[module.name] = self.side.similarity(module)
        similarity, skipped = self._scores[module.name]
        merged = merges(similarity, self.tau)
        combo = Combination(module.name, module.shape)
        combo.add(self.task_weight if merged else 1.0, task)
        if merged and self.safety_weight != 0.0:
            if not writing and self.safety_kind(module) == "dense":
                # scoring: a dense T' is dropped after its row, which needs only the similarity
                # (streamed by side.similarity, which also checks the weights are finite)
                combo.defer()
            else:
                combo.add(self.safety_weight, safety(), in_place=True)
        return combo, {"similarity": similarity, "merged": merged, "skipped": skipped}

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
    adapter: str | None = None,
    out: str | Path | None = None,
    *,
    finetuned: str | None = None,
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
    `tau` become task_weight * T + safety_weight * S; the others keep T. T is the update of
    `adapter` (a PEFT LoRA adapter on ALIGNED) or of `finetuned` (a full checkpoint of ALIGNED,
    T = W_finetuned - W_aligned on every linear layer of the numbered blocks): exactly one of them.
    Written as an exact LoRA when both are adapters, else as a patched checkpoint (a copy of
    ALIGNED, or of `finetuned` with the merged modules written over it) or (with `as_adapter`) a
    rank-`adapter_rank` truncated-SVD adapter of W_out - W_aligned."""
    return run(plan_safemerge(base, aligned, adapter, finetuned=finetuned, tau=tau, task_weight=task_weight, safety_weight=safety_weight,
                              as_adapter=as_adapter, adapter_rank=adapter_rank),
               out, dry_run=dry_run, force=force, progress=progress)


def plan_safemerge(base: str, aligned: str, adapter: str | None = None, *, finetuned: str | None = None, tau: float = DEFAULT_TAU,
                   task_weight: float = DEFAULT_TASK_WEIGHT, safety_weight: float = DEFAULT_SAFETY_WEIGHT, as_adapter: bool = False,
                   adapter_rank: int | None = None) -> Callable[[], SafeMergePatch]:
    """The run of `safemerge`, its settings checked, for the patch driver (or `inspect`)."""
    check_one_finetune(adapter, finetuned)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and -1.0 <= tau <= 1.0):
        raise RealignError(f"--tau must be a similarity in [-1, 1], got {tau}")
    check_weight("--task-weight", task_weight)
    check_weight("--safety-weight", safety_weight)
    check_output_options(as_adapter, adapter_rank)
    return lambda: SafeMergePatch(open_side(base, aligned, adapter, finetuned), tau=float(tau), task_weight=float(task_weight),
                                  safety_weight=float(safety_weight), as_adapter=as_adapter, adapter_rank=adapter_rank)
