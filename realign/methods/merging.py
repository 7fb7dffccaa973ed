"""Weight-space merges (RESTA, SafeMERGE, scaling): per module, T' = a weighted sum of the
fine-tuned delta T and the safety delta S, written back as W_aligned + T'.

Each term is low-rank (a LoRA's s B A, kept as factors) or dense. When every term of every module
is low-rank, T' is exactly a LoRA of the summed ranks: the factors are concatenated,
B' = [w1 s1 B1, w2 s2 B2], A' = [A1; A2], with per-module rank and alpha patterns giving scaling
1. No SVD, no approximation, and peft loads it as it is. A dense term (S from two full
checkpoints, or after DARE) makes T' dense: then the output is a patched copy of the aligned
checkpoint, or (`as_adapter`) a rank-R truncated SVD of T' with its measured error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RealignError
from ..io.adapter import Adapter, LoraModule
from ..io.checkpoint import Checkpoint
from ..io.adapter_writer import lora_config, write_lora
from ..io.shards import copy_checkpoint, layout, write_over
from ..linalg import LowRank, Matrix, truncated_factors
from ..report import Report
from .alignment import Alignment
from .patch import Patch, module_delta


@dataclass
class Combination:
    """T' of one module: a sum of low-rank terms (weights and scalings folded into the left
    factor) and at most one dense term."""

    name: str
    shape: tuple[int, int]  # [out, in]
    terms: list[LowRank] = field(default_factory=list)
    dense: torch.Tensor | None = None

    def add(self, weight: float, matrix: Matrix | None) -> None:
        if matrix is None or weight == 0.0:
            return
        if isinstance(matrix, LowRank):
            self.terms.append(LowRank(matrix.left * weight, matrix.right))
        else:
            self.dense = matrix * weight if self.dense is None else self.dense + matrix * weight

    @property
    def low_rank(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int:
        return sum(t.left.shape[1] for t in self.terms)

    def matrix(self) -> torch.Tensor:
        """T' as a dense float32 [out, in] matrix."""
        total = torch.zeros(self.shape, dtype=torch.float32) if self.dense is None else self.dense.clone()
        for term in self.terms:
            total.addmm_(term.left, term.right)
        return total

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with B' A' = T' exactly, for a low-rank T'."""
        return torch.cat([t.right for t in self.terms], dim=0), torch.cat([t.left for t in self.terms], dim=1)


def write_adapter(staging: Path, combos: list[Combination], base_model: str, fan_in_fan_out: bool) -> None:
    """The exact LoRA of low-rank T's: factors concatenated, scaling 1 by per-module patterns.
    Modules whose T' is zero (no term) are left out."""
    kept = [c for c in combos if c.terms]
    if not kept:
        raise RealignError("every module's merged update is zero (all weights 0): there is no adapter to write")
    factors = {c.name: c.factors() for c in kept}
    ranks = {c.name: c.rank for c in kept}
    config = lora_config([c.name for c in kept], max(ranks.values()), max(ranks.values()), base_model=base_model,
                         fan_in_fan_out=fan_in_fan_out)
    # peft reads a pattern key as a regular expression matched at the end of a dotted name, and the
    # first key that matches wins: escape the dots, and put longer names first so that a name
    # which is a dotted suffix of another cannot take the other's rank
    ordered = sorted(ranks.items(), key=lambda item: -len(item[0]))
    config["rank_pattern"] = {re.escape(name): rank for name, rank in ordered}
    config["alpha_pattern"] = {re.escape(name): rank for name, rank in ordered}
    write_lora(staging, config, factors)


def write_svd_adapter(staging: Path, combos: list[Combination], rank: int, base_model: str, fan_in_fan_out: bool) -> dict[str, float | None]:
    """A rank-`rank` LoRA of each (dense) T'; returns each module's measured relative error."""
    factors, errors = {}, {}
    for combo in combos:
        if rank > min(combo.shape):
            raise RealignError(f"--adapter-rank {rank} exceeds the dimension min{combo.shape} of module '{combo.name}'")
        right, basis, error = truncated_factors(combo.matrix().unsqueeze(0), rank)
        errors[combo.name] = error[0]
        if error[0] is not None:
            factors[combo.name] = (right[0], basis[0])
    if not factors:
        raise RealignError("every module's merged update is zero: there is no adapter to write")
    write_lora(staging, lora_config(list(factors), rank, rank, base_model=base_model, fan_in_fan_out=fan_in_fan_out), factors)
    return errors


def write_checkpoint(staging: Path, alignment: Alignment, combos: list[Combination]) -> dict:
    """A copy of the aligned checkpoint with W_aligned + T' written over each module's weight."""
    aligned = alignment.aligned
    if aligned is None or not aligned.is_safetensors:
        raise RealignError("a merged checkpoint is written from an aligned safetensors checkpoint; with an aligned adapter "
                           "or .bin files, use --as-adapter --adapter-rank R")
    copy_checkpoint(aligned, staging)
    keys = []
    for combo in combos:
        weight = alignment.aligned_key(combo.name)
        merged = alignment.aligned_weight(combo.name, torch.device("cpu")).add_(combo.matrix())
        write_over(aligned, staging, weight.key, merged.T if weight.transposed else merged)
        keys.append(weight.key)
    return layout(aligned, keys)


class MergePatch(Patch):
    """A weight-space merge on a fine-tuned adapter: loads the adapter, base and aligned (every
    adapted module planned by name), builds each module's T' with `combine`, and writes the exact
    LoRA, a truncated-SVD adapter or a patched aligned checkpoint. Subclasses set `command` and
    `settings` (for the report) and implement `combine`."""

    command = "merge"

    def __init__(self, base: str, aligned: str, adapter: str, as_adapter: bool, adapter_rank: int | None):
        self.names = {"base": str(base), "aligned": str(aligned), "adapter": str(adapter)}
        self.as_adapter, self.adapter_rank = as_adapter, adapter_rank
        self.adapter = Adapter.load(adapter, "adapter")
        self.adapter.ensure_finite()
        refuse_passthrough(self.adapter, "weight-space merges write LoRA modules only")
        base_ckpt = Checkpoint.open(base, "base")
        base_ckpt.validate()
        self.alignment = Alignment(base_ckpt, aligned)
        for module in self.adapter.modules:
            self.alignment.plan(module.name, (module.d_out, module.d_in), fan_in_fan_out=self.adapter.fan_in_fan_out)
        self.settings: dict = {}
        self.notes: list[str] = []
        self.extra_inputs: list[Path] = []

    def inputs(self) -> list[Path]:
        return [*self.alignment.directories, self.adapter.directory, *self.extra_inputs]

    def may_be_dense(self) -> bool:
        """Whether a term can be dense (then T' is written as a checkpoint or an SVD adapter)."""
        return self.alignment.kind == "checkpoint"

    def check_writable(self) -> None:
        """A dense T' is written over a copy of the aligned checkpoint: refuse now, before any work,
        what could not be written at the end."""
        aligned = self.alignment.aligned
        if self.may_be_dense() and not self.as_adapter and (aligned is None or not aligned.is_safetensors):
            raise RealignError("this merge is dense (a checkpoint S, DARE or a checkpoint safety vector), and a merged checkpoint is "
                               "written from an aligned safetensors checkpoint only; use --as-adapter --adapter-rank R")

    def safety(self, module: LoraModule) -> Matrix | None:
        """S of one module: V = W_aligned - W_base (None where an aligned adapter leaves it alone)."""
        return self.alignment.matrix(module.name, torch.device("cpu"))

    def combine(self, module: LoraModule, task: LowRank, safety: Matrix | None) -> tuple[Combination, dict]:
        raise NotImplementedError

    def score(self, progress) -> list[tuple[Combination, dict]]:
        results = []
        for i, module in enumerate(self.adapter.modules):
            task, safety = module_delta(self.adapter, module), self.safety(module)
            combo, extra = self.combine(module, task, safety)
            results.append((combo, {"name": module.name, "shape": [module.d_out, module.d_in], "task_rank": module.rank,
                                    "safety": None if safety is None else ("lora" if isinstance(safety, LowRank) else "dense"),
                                    **extra, "merged_rank": combo.rank if combo.low_rank else None}))
            if progress:
                progress(i + 1, len(self.adapter.modules))
        if self.as_adapter and all(combo.low_rank for combo, _ in results):
            self.notes.append("every term is low-rank, so the merge is written as its exact LoRA: --as-adapter and --adapter-rank "
                              "were not needed")
        return results

    def select(self, results) -> set[str]:
        return {row["name"] for combo, row in results if combo.terms or combo.dense is not None}

    def output_kind(self, results) -> str:
        if all(combo.low_rank for combo, _ in results):
            return "adapter"
        return "svd-adapter" if self.as_adapter else "checkpoint"

    def report(self, results, selected: set[str]) -> Report:
        kind = self.output_kind(results)
        return Report(command=self.command, inputs={**self.names, "aligned_kind": self.alignment.kind}, settings=self.settings,
                      modules=[row for _, row in results],
                      passthrough=[{"tensor": k, "reason": r} for k, r in self.adapter.passthrough.items()],
                      summary={"modules": len(results), "merged": len(selected), "output_kind": kind}, notes=list(self.notes))

    def deltas(self, results, selected: set[str]) -> dict[str, Matrix]:
        deltas = {}
        for combo, _ in results:
            if combo.low_rank and combo.terms:
                a, b = combo.factors()
                deltas[combo.name] = LowRank(b, a)
            elif not combo.low_rank:
                deltas[combo.name] = combo.matrix()
        return deltas

    def write(self, staging: Path, results, selected: set[str], report: Report) -> None:
        combos = [combo for combo, _ in results]
        kind, base_model = report.summary["output_kind"], self.names["aligned"]
        if kind == "adapter":
            write_adapter(staging, combos, base_model, self.adapter.fan_in_fan_out)
        elif kind == "svd-adapter":
            errors = write_svd_adapter(staging, combos, self.adapter_rank, base_model, self.adapter.fan_in_fan_out)
            for row in report.modules:
                row["reconstruction_error"] = errors[row["name"]]
            measured = [e for e in errors.values() if e is not None]
            report.summary.update(adapter_rank=self.adapter_rank, max_reconstruction_error=max(measured),
                                  mean_reconstruction_error=sum(measured) / len(measured))
        else:
            report.summary.update(write_checkpoint(staging, self.alignment, combos))


def check_output_options(as_adapter: bool, adapter_rank: int | None) -> None:
    if as_adapter and (adapter_rank is None or adapter_rank < 1):
        raise RealignError("--as-adapter needs --adapter-rank R with R >= 1 (the rank of the extracted LoRA)")
    if adapter_rank is not None and not as_adapter:
        raise RealignError("--adapter-rank applies only with --as-adapter")


def refuse_passthrough(adapter: Adapter, why: str) -> None:
    """Adapters with tensors that are not linear LoRA factors (modules_to_save copies, embedding
    LoRA) are refused where only the LoRA updates would be kept: they would be dropped silently."""
    if adapter.passthrough:
        key, reason = next(iter(adapter.passthrough.items()))
        raise RealignError(f"the adapter holds tensors that are not linear LoRA factors ('{key}': {reason.split(' (')[0]}); "
                           f"{why}, so they would be lost")
