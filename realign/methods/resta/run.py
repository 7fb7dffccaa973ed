"""`realign resta`: T' = task_weight * T + safety_weight * S on every module of a fine-tuned
adapter (T = s B A) or of a full fine-tuned checkpoint (T = W_finetuned - W_aligned on every linear
layer), S = W_aligned - W_base (the data-free stand-in for the paper's safety vector) or, with
`safety_vector`, the paper's own W_aligned - W_unaligned."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ...buffers import Buffers
from ...errors import RealignError
from ...io.adapter import ADAPTER_CONFIG, Adapter
from ...io.checkpoint import Checkpoint, resolve_local
from ...io.names import WeightResolver, find_module
from ...linalg import LowRank, Matrix, frobenius_norm
from ...progress import Progress
from ...report import Report
from ..alignment import orient, read_weight
from ..merged_output import Combination
from ..merging import MergeModule, MergePatch, check_output_options
from ..merging_full import check_one_finetune, open_side
from ..patch import run
from .math import dare as dare_drop
from .math import module_seed


class RestaPatch(MergePatch):
    command = "resta"

    def __init__(self, side, *, task_weight: float, safety_weight: float, safety_vector: str | None, dare_p: float | None,
                 seed: int, as_adapter: bool, adapter_rank: int | None):
        super().__init__(side, as_adapter, adapter_rank)
        self.task_weight, self.safety_weight, self.dare_p, self.seed = task_weight, safety_weight, dare_p, seed
        self.vector_adapter: Adapter | None = None
        self.vector_checkpoint: Checkpoint | None = None
        if safety_vector is not None:
            self._open_vector(safety_vector)
        self.settings = {"task_weight": task_weight, "safety_weight": safety_weight, "safety_vector": safety_vector,
                         "dare": dare_p, "seed": seed if dare_p else None}
        self.notes.append("S = W_aligned - W_unaligned (the given safety vector)" if safety_vector is not None else
                          "S = W_aligned - W_base: the data-free stand-in for RESTA's safety vector (W_aligned - W_unaligned)")
        if dare_p:
            self.notes.append(f"DARE on S: each entry dropped with probability {dare_p}, the rest scaled by 1/(1-p), seeded per module")
        self.check_writable()

    def may_be_dense(self) -> bool:
        return super().may_be_dense() or bool(self.dare_p) or self.vector_checkpoint is not None

    def _open_vector(self, spec: str) -> None:
        """The unaligned model: a checkpoint, or an adapter that un-aligns ALIGNED (S = -its delta)."""
        directory = resolve_local(spec, "safety vector")
        self.extra_inputs.append(directory)
        if (directory / ADAPTER_CONFIG).exists():
            self.vector_adapter = Adapter.load(str(directory), "safety vector adapter")
            self.vector_adapter.ensure_finite("safety vector adapter")
            return
        self.vector_checkpoint = Checkpoint(directory, "safety vector")
        self.vector_checkpoint.validate()
        resolver = WeightResolver(self.vector_checkpoint.keys(), self.vector_checkpoint.config, "safety vector")
        self._vector_weights = {
            m.name: orient(self.vector_checkpoint, resolver.weight_key(m.name), m.name, m.shape, m.transposed,
                           self.side.fan_in_fan_out)
            for m in self.side.modules
        }

    def safety(self, module: MergeModule, writing: bool = False,
               buffers: Buffers | None = None) -> tuple[Matrix | None, torch.Tensor | None, float | None]:
        cpu = torch.device("cpu")
        aligned, norm = None, None
        if self.vector_checkpoint is not None:
            s = self.alignment.aligned_weight(module.name, cpu) - read_weight(self.vector_checkpoint, self._vector_weights[module.name],
                                                                             cpu, torch.float32)
        elif self.vector_adapter is not None:
            found = find_module(module.name, {m.name for m in self.vector_adapter.modules}, "safety vector adapter")
            own = self.vector_adapter.module(found) if found is not None else None
            if own is not None and (own.d_out, own.d_in) != module.shape:
                raise RealignError(f"module '{module.name}': the safety vector adapter is {own.d_out}x{own.d_in}, the module "
                                   f"{module.shape[0]}x{module.shape[1]}")
            s = None if own is None else LowRank(-own.scaling * self.vector_adapter.tensors[own.key_b].float(),
                                                 self.vector_adapter.tensors[own.key_a].float())
        else:
            s, aligned, norm = super().safety(module, writing, buffers)
        if s is None or not self.dare_p:
            return s, aligned, norm
        dense = s.left @ s.right if isinstance(s, LowRank) else s
        index = self.side.modules.index(module)
        # DARE changes S: its norm is measured again (None)
        return dare_drop(dense, self.dare_p, torch.Generator().manual_seed(module_seed(self.seed, index))), aligned, None

    def safety_kind(self, module: MergeModule) -> str | None:
        if self.vector_adapter is not None:
            return None  # low-rank, or absent where the vector adapter leaves the module alone
        return "dense" if self.vector_checkpoint is not None else super().safety_kind(module)

    def combine(self, module: MergeModule, task: Matrix, safety, writing: bool) -> tuple[Combination, dict]:
        combo = Combination(module.name, module.shape)
        if not writing and self.write_follows and self.safety_weight != 0.0 and self.safety_kind(module) == "dense":
            # a dense S is built again to be written: its norm and its finiteness check are left to
            # that pass, so the weights behind it are read once, not twice (the row is filled then)
            self.unchecked.add(module.name)
            combo.add(self.task_weight, task)
            combo.defer()
            return combo, {"task_norm": frobenius_norm(task), "safety_norm": None}
        s = safety()
        # the row's norms first: S is then scaled in place. A dense S is dropped after scoring
        # (built again when written), so scoring needs its norm only; writing needs only the norm
        # scoring left to it.
        if writing:
            row = {"safety_norm": safety.norm()} if module.name in self.unchecked else {}
        else:
            row = {"task_norm": frobenius_norm(task), "safety_norm": safety.norm()}
        combo.add(self.task_weight, task)
        if not writing and s is not None and not isinstance(s, LowRank) and self.safety_weight != 0.0:
            combo.defer()
        else:
            combo.add(self.safety_weight, s, in_place=True)
        return combo, row


def check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise RealignError(f"{name} must be a finite number >= 0, got {value}")


def resta(
    base: str,
    aligned: str,
    adapter: str | None = None,
    out: str | Path | None = None,
    *,
    finetuned: str | None = None,
    safety_weight: float = 1.0,
    task_weight: float = 1.0,
    safety_vector: str | None = None,
    dare: float | None = None,
    seed: int = 0,
    as_adapter: bool = False,
    adapter_rank: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """RESTA: the fine-tuned update T and the safety vector S merged as
    T' = task_weight * T + safety_weight * S on every module, written as W_aligned + T'.

    The fine-tuned model is `adapter` (a PEFT LoRA adapter on ALIGNED, T = s B A on its modules)
    or `finetuned` (a full checkpoint of ALIGNED, T = W_finetuned - W_aligned on every linear
    layer of the numbered blocks): exactly one of them.

    S = W_aligned - W_base, or W_aligned - W_unaligned with `safety_vector` (an unaligned
    checkpoint, or an adapter on ALIGNED that un-aligns it). `dare` in [0, 1): DARE on S with
    `seed`. When T and S are LoRAs the output is their exact concatenated LoRA; a dense term (ALIGNED
    a checkpoint, DARE, a checkpoint safety vector, a full fine-tune) gives a patched checkpoint (a
    copy of ALIGNED, or of `finetuned`) or, with `as_adapter`, a rank-`adapter_rank` truncated-SVD
    adapter of W_out - W_aligned with its measured error.
    `safety_weight=0` is plain scaling of T."""
    return run(plan_resta(base, aligned, adapter, finetuned=finetuned, safety_weight=safety_weight, task_weight=task_weight,
                          safety_vector=safety_vector, dare=dare, seed=seed, as_adapter=as_adapter, adapter_rank=adapter_rank),
               out, dry_run=dry_run, force=force, progress=progress)


def plan_resta(base: str, aligned: str, adapter: str | None = None, *, finetuned: str | None = None, safety_weight: float = 1.0,
               task_weight: float = 1.0, safety_vector: str | None = None, dare: float | None = None, seed: int = 0,
               as_adapter: bool = False, adapter_rank: int | None = None) -> Callable[[], RestaPatch]:
    """The run of `resta`, its settings checked, for the patch driver (or `inspect`)."""
    check_one_finetune(adapter, finetuned)
    check_weight("--safety-weight", safety_weight)
    check_weight("--task-weight", task_weight)
    if dare is not None and not (isinstance(dare, (int, float)) and 0.0 <= dare < 1.0):
        raise RealignError(f"--dare must be a drop probability in [0, 1), got {dare}")
    check_output_options(as_adapter, adapter_rank)
    return lambda: RestaPatch(open_side(base, aligned, adapter, finetuned), task_weight=float(task_weight),
                              safety_weight=float(safety_weight), safety_vector=safety_vector, dare_p=dare, seed=seed,
                              as_adapter=as_adapter, adapter_rank=adapter_rank)
