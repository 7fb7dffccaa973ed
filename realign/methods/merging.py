"""Weight-space merges (RESTA, SafeMERGE, scaling): per module, T' = a weighted sum of the
fine-tuned delta T and the safety delta S, written back as W_aligned + T'.

Each term is low-rank (a LoRA's s B A, kept as factors) or dense. When every term of every module
is low-rank, T' is exactly a LoRA of the summed ranks: the factors are concatenated,
B' = [w1 s1 B1, w2 s2 B2], A' = [A1; A2], with per-module rank and alpha patterns giving scaling
1. No SVD, no approximation, and peft loads it as it is. A dense term (S from two full
checkpoints, or after DARE) makes T' dense: then the output is a patched copy of the aligned
checkpoint, or (`as_adapter`) a rank-R truncated SVD of T' with its measured error.

The fine-tuned side is a LoRA adapter (`AdapterSide`: T = s B A, kept low-rank) or a full
fine-tuned checkpoint (merging_full.FullSide: T = W_finetuned - W_aligned, dense). A dense side
never holds the model in memory: the scoring pass keeps each module's report row only, and the
writing pass builds T' again one module at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..buffers import Buffers
from ..errors import RealignError
from ..io.adapter import Adapter
from ..io.checkpoint import Checkpoint
from ..linalg import LowRank, Matrix, frobenius_norm
from ..report import Report
from .alignment import Alignment
from .merged_output import Combination, check_adapter_rank, write_adapter, write_checkpoint, write_svd_adapter
from .patch import Patch, module_delta
from .safelora.math import score_module


@dataclass(frozen=True)
class MergeModule:
    """One module a merge covers: its name, [out, in] shape, the rank of T (None: dense) and how
    the model stores its weight (None: unknown, the adapter's fan_in_fan_out decides)."""

    name: str
    shape: tuple[int, int]
    rank: int | None = None
    transposed: bool | None = None


class AdapterSide:
    """The fine-tuned side as a PEFT LoRA adapter on ALIGNED: T = s B A on every adapted module."""

    kind = "adapter"
    dense = False  # T is low-rank: T' is kept per module between scoring and writing
    unwritable = ("this merge is dense (a checkpoint S, DARE or a checkpoint safety vector), and a merged checkpoint is "
                  "written from an aligned safetensors checkpoint only; use --as-adapter --adapter-rank R")

    def __init__(self, base: str, aligned: str, adapter: str):
        self.adapter = Adapter.load(adapter, "adapter")
        self.adapter.ensure_finite()
        refuse_passthrough(self.adapter, "weight-space merges write LoRA modules only")
        base_ckpt = Checkpoint.open(base, "base")
        base_ckpt.validate()
        self.alignment = Alignment(base_ckpt, aligned)
        self.fan_in_fan_out = self.adapter.fan_in_fan_out
        self.modules = [MergeModule(m.name, (m.d_out, m.d_in), m.rank) for m in self.adapter.modules]
        for module in self.modules:
            self.alignment.plan(module.name, module.shape, fan_in_fan_out=self.fan_in_fan_out)
        self.names = {"base": str(base), "aligned": str(aligned), "adapter": str(adapter)}
        self.directories = [*self.alignment.directories, self.adapter.directory]
        self.passthrough = self.adapter.passthrough
        self.target = self.alignment.aligned  # what a dense merge is written over
        self.stored = self.alignment.aligned_key

    def task(self, module: MergeModule) -> LowRank:
        return module_delta(self.adapter, self.adapter.module(module.name))

    def similarity(self, module: MergeModule) -> tuple[float | None, str | None]:
        """Safe LoRA's cos(T, C T) against V = W_aligned - W_base (None where undefined, and why)."""
        lora = self.adapter.module(module.name)
        a, b = self.adapter.tensors[lora.key_a], self.adapter.tensors[lora.key_b]
        projected, norm = self.alignment.approx(module.name, b, torch.device("cpu"))
        score = score_module(module.name, a, b, projected, norm)
        return score.similarity, score.skip_reason


class LazySafety:
    """S of one module, computed on first call (SafeMERGE's scoring of a module it merges needs
    only the similarity, not a dense S). The caller owns the tensor it returns, until the next
    module where it lies in the pass's buffers."""

    def __init__(self, compute: Callable[[], tuple[Matrix | None, torch.Tensor | None, float | None]]):
        self._compute = compute
        self.computed = False
        self.value: Matrix | None = None
        self.aligned: torch.Tensor | None = None  # W_aligned in float32, where computing S read it
        self.known_norm: float | None = None  # frobenius_norm(S), where computing S measured it

    def __call__(self) -> Matrix | None:
        if not self.computed:
            self.value, self.aligned, self.known_norm = self._compute()
            self.computed = True
        return self.value

    def norm(self) -> float | None:
        """frobenius_norm(S) (None where S is None), measured once."""
        value = self()
        if value is None:
            return None
        return self.known_norm if self.known_norm is not None else frobenius_norm(value)

    def kind(self) -> str | None:
        value = self()
        return None if value is None else ("lora" if isinstance(value, LowRank) else "dense")


class MergePatch(Patch):
    """A weight-space merge on a fine-tuned adapter or full checkpoint (`side`, every covered
    module planned by name), building each module's T' with `combine` and writing the exact LoRA,
    a truncated-SVD adapter or a patched checkpoint (a copy of ALIGNED for an adapter, of the
    fine-tuned checkpoint for a full fine-tune). Subclasses set `command` and `settings` (for the
    report) and implement `combine`."""

    command = "merge"

    def __init__(self, side, as_adapter: bool, adapter_rank: int | None):
        self.side, self.alignment = side, side.alignment
        self.names = dict(side.names)
        self.as_adapter, self.adapter_rank = as_adapter, adapter_rank
        self.settings: dict = {}
        self.notes: list[str] = []
        self.extra_inputs: list[Path] = []
        # modules whose dense S the scoring pass left unread (RESTA with a write to follow): the
        # writing pass checks it is finite
        self.unchecked: set[str] = set()
        if side.dense:
            self.notes.append("T = W_finetuned - W_aligned in float32 on every linear layer of the numbered blocks (Safe LoRA's "
                              "all-linear targets); a merged checkpoint is a copy of the fine-tuned one, every other tensor "
                              "as it is there")

    def inputs(self) -> list[Path]:
        return [*self.side.directories, *self.extra_inputs]

    def may_be_dense(self) -> bool:
        """Whether a term can be dense (then T' is written as a checkpoint or an SVD adapter)."""
        return self.side.dense or self.alignment.kind == "checkpoint"

    def check_writable(self) -> None:
        """A dense T' is written over a copy of a safetensors checkpoint: refuse now, before any
        work, what could not be written at the end."""
        target = self.side.target
        if self.may_be_dense() and not self.as_adapter and (target is None or not target.is_safetensors):
            raise RealignError(self.side.unwritable)
        if self.side.dense and self.as_adapter:  # surely an SVD adapter: its rank is checked before the work
            for module in self.side.modules:
                check_adapter_rank(self.adapter_rank, module.name, module.shape)

    def safety(self, module: MergeModule, writing: bool = False,
               buffers: Buffers | None = None) -> tuple[Matrix | None, torch.Tensor | None, float | None]:
        """(S, W_aligned or None, ||S||_F or None) of one module: S = V = W_aligned - W_base (None
        where an aligned adapter leaves it alone), a tensor the caller owns (in `buffers`, where
        given, until the module is done). From checkpoints W_aligned in float32 comes along (read
        for S anyway; `write_checkpoint` reuses it) and so does ||S||_F (computed to check S is
        finite); `writing` skips that check where the scoring pass did it on the same weights
        (not for a module in `unchecked`)."""
        if self.alignment.kind == "checkpoint":
            check = not writing or module.name in self.unchecked
            return self.alignment.difference(module.name, torch.device("cpu"), check=check, buffers=buffers)
        return self.alignment.matrix(module.name, torch.device("cpu")), None, None

    def safety_kind(self, module: MergeModule) -> str | None:
        """What S is, without computing it, where that is known: from two checkpoints it is dense."""
        return "dense" if self.alignment.kind == "checkpoint" else None

    def combine(self, module: MergeModule, task: Matrix, safety: "LazySafety", writing: bool) -> tuple[Combination, dict]:
        """T' and the row's own fields. `writing`: T' is built to be written, its row dropped."""
        raise NotImplementedError

    def merge(self, module: MergeModule, writing: bool = False, buffers: Buffers | None = None) -> tuple[Combination, dict]:
        """T' of one module and its report row (with `writing`, T' is what counts: the row's
        figures may be left out). While scoring, a dense T' is dropped after its row is made, so
        a subclass may leave its dense term out (`Combination.defer`) where the row needs none.
        With `buffers` a dense S (and T' built on it) lies in its slots: such a T' must be used
        before the next module is merged."""
        task = self.side.task(module)
        safety = LazySafety(lambda: self.safety(module, writing, buffers))
        combo, extra = self.combine(module, task, safety, writing)
        combo.aligned = safety.aligned if writing else None  # kept only for the write that follows
        kind = None if safety.computed else self.safety_kind(module)
        if kind is None:  # computed, or not known without S (then low-rank or absent: cheap to compute)
            kind = safety.kind()
        return combo, {"name": module.name, "shape": list(module.shape), "task_rank": module.rank, "safety": kind,
                       **extra, "merged_rank": combo.rank if combo.low_rank else None}

    def score(self, progress) -> list[tuple[Combination | None, dict]]:
        """(T', row) per module; T' is None where it is dense (built again when written: a dense T' of
        every module of a 7B model is 24 GiB)."""
        results = []
        # a T' kept here is low-rank: never one that holds a dense S from these buffers
        buffers = Buffers()
        for i, module in enumerate(self.side.modules):
            combo, row = self.merge(module, buffers=buffers)
            # a dense T' (a checkpoint S, DARE) is built again when written, never kept for every module
            results.append((None if self.side.dense or not combo.low_rank else combo, row))
            if progress:
                progress(i + 1, len(self.side.modules))
        if self.as_adapter and not self.side.dense and all(combo is not None for combo, _ in results):
            self.notes.append("every term is low-rank, so the merge is written as its exact LoRA: --as-adapter and --adapter-rank "
                              "were not needed")
        return results

    def combos(self, results, names: set[str] | None = None, buffers: Buffers | None = None) -> Iterable[Combination]:
        """Each module's T' (those in `names`, if given), from `results` or built again (in
        `buffers` where given: then each must be used before the next is asked for). Building
        one again fills the figures its scoring left to this pass into its report row."""
        for module, (combo, row) in zip(self.side.modules, results):
            if names is None or module.name in names:
                if combo is None:
                    combo, fresh = self.merge(module, writing=True, buffers=buffers)
                    row.update({key: value for key, value in fresh.items() if row.get(key) is None and value is not None})
                yield combo

    def select(self, results) -> set[str]:
        return {row["name"] for combo, row in results if combo is None or combo.terms or combo.dense is not None}

    def output_kind(self, results) -> str:
        if not self.side.dense and all(combo is not None for combo, _ in results):
            return "adapter"
        return "svd-adapter" if self.as_adapter else "checkpoint"

    def report(self, results, selected: set[str]) -> Report:
        kind = self.output_kind(results)
        return Report(command=self.command, inputs={**self.names, "aligned_kind": self.alignment.kind}, settings=self.settings,
                      modules=[row for _, row in results],
                      passthrough=[{"tensor": k, "reason": r} for k, r in self.side.passthrough.items()],
                      summary={"modules": len(results), "merged": len(selected), "output_kind": kind}, notes=list(self.notes))

    def deltas(self, results, selected: set[str]) -> dict[str, Matrix]:
        if self.side.dense:
            return super().deltas(results, selected)
        deltas = {}
        for combo in self.combos(results):
            if combo.low_rank and combo.terms:
                a, b = combo.factors()
                deltas[combo.name] = LowRank(b, a)
            elif not combo.low_rank:
                deltas[combo.name] = combo.matrix()
        return deltas

    def write(self, staging: Path, results, selected: set[str], report: Report) -> None:
        kind, base_model = report.summary["output_kind"], self.names["aligned"]
        if kind == "adapter":
            write_adapter(staging, [combo for combo, _ in results], base_model, self.side.fan_in_fan_out)
        elif kind == "svd-adapter":
            errors = write_svd_adapter(staging, self.combos(results), self.adapter_rank, base_model, self.side.fan_in_fan_out)
            for row in report.modules:
                row["reconstruction_error"] = errors[row["name"]]
            measured = [e for e in errors.values() if e is not None]
            report.summary.update(adapter_rank=self.adapter_rank, max_reconstruction_error=max(measured),
                                  mean_reconstruction_error=sum(measured) / len(measured))
            if self.side.dense:
                report.notes.append("the adapter carries the merged linear layers only: loaded on ALIGNED, every other tensor the "
                                    "fine-tune changed (embeddings, norms, biases) is ALIGNED's")
        else:
            # over a copy of the fine-tuned checkpoint a module left out keeps W_finetuned (T' = T);
            # over a copy of ALIGNED every module is written
            names = selected if self.side.dense else None
            written = [m.name for m in self.side.modules if names is None or m.name in names]
            buffers = Buffers()
            report.summary.update(write_checkpoint(staging, self.alignment, self.side.target, self.side.stored, written,
                                                   self.combos(results, names, buffers), buffers))


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
