"""A merged module's T' (`Combination`: low-rank terms and at most one dense term) and the three
ways a merge writes its T's: the exact LoRA of low-rank T's, a truncated-SVD LoRA of dense ones,
or W_aligned + T' over a copy of a checkpoint, one module at a time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..buffers import Buffers
from ..errors import RealignError
from ..io.adapter_writer import lora_config, write_lora
from ..io.checkpoint import Checkpoint
from ..io.shards import copy_checkpoint, layout, write_over
from ..linalg import LowRank, Matrix, truncated_factors
from .alignment import Alignment, StoredWeight

@dataclass
class Combination:
    """T' of one module: a sum of low-rank terms (weights and scalings folded into the left
    factor) and at most one dense term."""

    name: str
    shape: tuple[int, int]  # [out, in]
    terms: list[LowRank] = field(default_factory=list)
    dense: torch.Tensor | None = None
    # a dense term left out while scoring (only the report row was needed): T' is dense, and is
    # built again, dense term included, when written
    deferred: bool = False
    # W_aligned in float32 when computing S already read it (the writing pass adds T' to it in
    # place instead of reading and upcasting it again)
    aligned: torch.Tensor | None = None

    def add(self, weight: float, matrix: Matrix | None, in_place: bool = False) -> None:
        """Add weight * matrix. `in_place`: a dense `matrix` is the caller's own fresh tensor, used
        no more: it is scaled in place and kept (no copy; x * 1.0 is x, so weight 1 costs no pass),
        the same floats as `matrix * weight`."""
        if matrix is None or weight == 0.0:
            return
        if isinstance(matrix, LowRank):
            self.terms.append(LowRank(matrix.left * weight, matrix.right))
            return
        if in_place:
            scaled = matrix if weight == 1.0 else matrix.mul_(weight)
        else:
            scaled = matrix * weight
        # self.dense is always this combination's own tensor, so the sum can go into it
        self.dense = scaled if self.dense is None else self.dense.add_(scaled)

    def defer(self) -> None:
        """Mark a dense term as left out (scoring that needs only the row)."""
        self.deferred = True

    @property
    def low_rank(self) -> bool:
        return self.dense is None and not self.deferred

    @property
    def rank(self) -> int:
        return sum(t.left.shape[1] for t in self.terms)

    def matrix(self, in_place: bool = False) -> torch.Tensor:
        """T' as a dense float32 [out, in] matrix. `in_place`: the low-rank terms are added into
        the dense term's own storage instead of a copy (the same floats); the dense term then is
        T' and the terms are dropped, so the combination still stands for T'. For a combination
        built to be written and dropped; never one that is shared."""
        if self.deferred:
            raise AssertionError(f"{self.name}: a combination scored without its dense term cannot be built")
        if in_place and self.dense is not None:
            for term in self.terms:
                self.dense.addmm_(term.left, term.right)
            self.terms = []
            return self.dense
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


def write_svd_adapter(staging: Path, combos: Iterable[Combination], rank: int, base_model: str,
                      fan_in_fan_out: bool) -> dict[str, float | None]:
    """A rank-`rank` LoRA of each (dense) T', one module at a time; returns each module's measured
    relative error."""
    factors, errors = {}, {}
    for combo in combos:
        check_adapter_rank(rank, combo.name, combo.shape)
        right, basis, error = truncated_factors(combo.matrix().unsqueeze(0), rank)
        errors[combo.name] = error[0]
        if error[0] is not None:
            factors[combo.name] = (right[0], basis[0])
    if not factors:
        raise RealignError("every module's merged update is zero: there is no adapter to write")
    write_lora(staging, lora_config(list(factors), rank, rank, base_model=base_model, fan_in_fan_out=fan_in_fan_out), factors)
    return errors


def check_adapter_rank(rank: int, name: str, shape: tuple[int, int]) -> None:
    if rank > min(shape):
        raise RealignError(f"--adapter-rank {rank} exceeds the dimension min{tuple(shape)} of module '{name}'")


def write_checkpoint(staging: Path, alignment: Alignment, target: Checkpoint, stored: Callable[[str], StoredWeight],
                     names: list[str], combos: Iterable[Combination], buffers: Buffers | None = None) -> dict:
    """A copy of `target` (ALIGNED, or the full fine-tuned checkpoint) with W_aligned + T' written
    over the weight of each module in `names`, one module at a time; every other byte as it was.
    `combos` yields those modules' T', is consumed one at a time and may hold tensors in
    `buffers` (`MergePatch.combos`)."""
    planned = [stored(name).key for name in names]
    copy_checkpoint(target, staging, left_out=planned)  # their bytes are written once, below
    keys = []
    for combo in combos:
        weight = stored(combo.name)
        aligned = combo.aligned
        if aligned is None:
            aligned = alignment.aligned_weight(combo.name, torch.device("cpu"), buffers)
        combo.aligned = None  # consumed: the sum goes into it
        # the combination is built here and dropped after, so T' may take its dense term's storage
        merged = aligned.add_(combo.matrix(in_place=True))
        write_over(target, staging, weight.key, merged.T if weight.transposed else merged, buffers)
        keys.append(weight.key)
    if sorted(keys) != sorted(planned):  # pragma: no cover - a hole left unwritten would be zeros
        raise AssertionError(f"wrote {len(keys)} of {len(planned)} planned weights")
    return layout(target, keys)
