"""`realign safelora` on a PEFT adapter: B' = C B in the modules whose update strays from the
alignment direction; every other tensor of the adapter is copied byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ...errors import RealignError
from ...io.adapter import Adapter
from ...io.adapter_writer import write_patched
from ...io.checkpoint import Checkpoint
from ...io.device import resolve_device
from ...linalg import LowRank, frobenius_norm, lowrank_top_left_singular_vectors, rank_is_defined, top_left_singular_vectors
from ...progress import Progress
from ...report import Report
from ..alignment import Alignment
from ..patch import adapter_deltas, run
from . import math as method
from .scoring import SafeLoraPatch, check_scored, make_settings, module_row, validate

# Upper bound on the float64 alignment matrices stacked for one batched decomposition.
_EXACT_BATCH_BYTES = 1 << 29


def exact_bases(alignment: Alignment, modules: list[tuple[str, tuple[int, int]]], rank: int,
                device: torch.device) -> dict[str, tuple[torch.Tensor, float]]:
    """(U_k, ||V||_F) for every module (name, [out, in]) whose V is non-zero: one batched
    decomposition per group of same-shaped modules, chunked to bound memory."""
    bases: dict[str, tuple[torch.Tensor, float]] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in modules:
        groups.setdefault(tuple(shape), []).append(name)
    for (d_out, d_in), members in groups.items():
        if rank > min(d_out, d_in):
            raise RealignError(f"--rank {rank} exceeds the dimension min({d_out}, {d_in}) of the {d_out}x{d_in} modules")
        per_chunk = max(1, _EXACT_BATCH_BYTES // (8 * d_out * d_in))
        for start in range(0, len(members), per_chunk):
            dense: list[tuple[str, torch.Tensor, float]] = []
            for name in members[start : start + per_chunk]:
                v = alignment.matrix(name, device)
                norm = 0.0 if v is None else frobenius_norm(v)
                if norm == 0.0:
                    continue
                if isinstance(v, LowRank):
                    u, sigma = lowrank_top_left_singular_vectors(v, rank)
                    check_rank(name, sigma, rank)
                    bases[name] = (u, norm)
                else:
                    dense.append((name, v, norm))
            if dense:
                u, sigma = top_left_singular_vectors(torch.stack([v for _, v, _ in dense]), rank)
                for i, (name, _, norm) in enumerate(dense):
                    check_rank(name, sigma[i], rank)
                    bases[name] = (u[i], norm)
    return bases


def check_rank(name: str, sigma: torch.Tensor, rank: int) -> None:
    if not rank_is_defined(sigma, rank):
        raise RealignError(f"--rank {rank}: the alignment matrix of '{name}' has rank below {rank}, so its rank-{rank} "
                           "projector is not defined; use a smaller --rank")


class AdapterPatch(SafeLoraPatch):
    def __init__(self, base: str, aligned: str, adapter: str, settings: method.Settings, device: torch.device):
        self.names = {"base": str(base), "aligned": str(aligned), "adapter": str(adapter)}
        self.settings, self.device = settings, device
        self.fine_tuned = Adapter.load(adapter, "adapter")
        validate(settings, len(self.fine_tuned.modules))
        base_ckpt = Checkpoint.open(base, "base")
        base_ckpt.validate()
        self.alignment = Alignment(base_ckpt, aligned)
        self.kind = self.alignment.kind
        for module in self.fine_tuned.modules:
            self.alignment.plan(module.name, (module.d_out, module.d_in), fan_in_fan_out=self.fine_tuned.fan_in_fan_out)
        self.fine_tuned.ensure_finite()

    def inputs(self) -> list[Path]:
        return [*self.alignment.directories, self.fine_tuned.directory]

    def score(self, progress: Progress | None) -> list[method.ModuleScore]:
        dev, modules = self.device, self.fine_tuned.modules
        bases = {}
        if self.settings.projection == method.EXACT:
            bases = exact_bases(self.alignment, [(m.name, (m.d_out, m.d_in)) for m in modules], self.settings.rank, dev)
        scores = []
        for i, module in enumerate(modules):
            a = self.fine_tuned.tensors[module.key_a].to(dev)
            b = self.fine_tuned.tensors[module.key_b].to(dev)
            if self.settings.projection == method.EXACT:
                basis, norm = bases.get(module.name, (None, 0.0))
                projected = None if basis is None else method.exact_projection(basis, b)
            else:
                projected, norm = self.alignment.approx(module.name, b, dev)
            scores.append(method.score_module(module.name, a, b, projected, norm))
            if progress:
                progress(i + 1, len(modules))
        check_scored(scores, self.settings, "no module has a defined similarity: base and aligned are equal on every adapted "
                                            "module, or the adapter is zero")
        return scores

    def report(self, scores: list[method.ModuleScore], selected: set[str]) -> Report:
        rows = [module_row(m.name, (m.d_out, m.d_in), m.rank, m.scaling, s, selected) for m, s in zip(self.fine_tuned.modules, scores)]
        return self.safelora_report(scores, selected, rows, self.fine_tuned.passthrough)

    def replaced(self, scores: list[method.ModuleScore], selected: set[str]) -> dict:
        return {self.fine_tuned.module(s.name).key_b: s.projected_b for s in scores if s.name in selected}

    def write(self, staging: Path, scores: list[method.ModuleScore], selected: set[str], report: Report) -> None:
        write_patched(self.fine_tuned, staging, self.replaced(scores, selected))

    def deltas(self, scores: list[method.ModuleScore], selected: set[str]) -> dict:
        return adapter_deltas(self.fine_tuned, self.replaced(scores, selected))


def safelora(
    base: str,
    aligned: str,
    adapter: str,
    out: str | Path | None = None,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    projection: str = method.APPROX,
    rank: int | None = None,
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Safe LoRA on the PEFT adapter `adapter` trained on `aligned`; writes a patched adapter to `out`.

    `aligned` is a full checkpoint, or a PEFT adapter on `base` (then V is its low-rank update).
    Selection: similarity <= threshold (default 0.5), or the `top_k` least similar modules;
    `projection` "approx" (the paper's C = V V^T / ||V||_F) or "exact" (the rank-`rank`
    projector onto V's top singular vectors). Returns the report; raises RealignError on bad
    input, before anything is written.
    """
    return run(plan_safelora(base, aligned, adapter, threshold=threshold, top_k=top_k, projection=projection, rank=rank,
                             device=device), out, dry_run=dry_run, force=force, progress=progress)


def plan_safelora(base: str, aligned: str, adapter: str, *, threshold: float | None = None, top_k: int | None = None,
                  projection: str = method.APPROX, rank: int | None = None, device: str = "auto") -> Callable[[], AdapterPatch]:
    """The run of `safelora` on an adapter, for the patch driver (or `inspect`)."""
    settings = make_settings(threshold, top_k, projection, rank)
    return lambda: AdapterPatch(base, aligned, adapter, settings, resolve_device(device))
