"""`realign safelora`: project a fine-tuned LoRA adapter onto the alignment subspace."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checks import ensure_finite
from ..device import resolve_device
from ..errors import RealignError
from ..io.adapter import ADAPTER_CONFIG, Adapter, LoraModule, write_adapter
from ..io.checkpoint import Checkpoint, resolve_local
from ..io.names import WeightResolver, find_module
from ..io.output import atomic_directory, check_target
from ..linalg import LowRank, Matrix, frobenius_norm, lowrank_top_left_singular_vectors, rank_is_defined, top_left_singular_vectors
from ..methods import safelora as method
from ..report import Report

REPORT_FILE = "realign_report.json"
# Upper bound on the float64 alignment matrices stacked for one batched decomposition.
_EXACT_BATCH_BYTES = 1 << 29

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Weight:
    key: str
    transposed: bool  # stored [in, out] (GPT-2 Conv1D, fan_in_fan_out)


class _FullAlignment:
    """V = W_aligned - W_base from two full checkpoints, read one module at a time."""

    kind = "checkpoint"

    def __init__(self, base: Checkpoint, aligned: Checkpoint, adapter: Adapter):
        self.base, self.aligned = base, aligned
        self._plan: dict[str, tuple[_Weight, _Weight]] = {}
        base_names = WeightResolver(base.keys(), base.config, "base")
        aligned_names = WeightResolver(aligned.keys(), aligned.config, "aligned")
        for module in adapter.modules:
            wb = _orient(module, base_names.weight_key(module.name), base, adapter.fan_in_fan_out)
            wa = _orient(module, aligned_names.weight_key(module.name), aligned, adapter.fan_in_fan_out)
            if base.shape(wb.key) != aligned.shape(wa.key):
                raise RealignError(
                    f"module '{module.name}': base weight {base.shape(wb.key)} and aligned weight "
                    f"{aligned.shape(wa.key)} differ in shape; are they the same architecture?"
                )
            self._plan[module.name] = (wb, wa)

    def _weights(self, module: LoraModule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_aligned, W_base) as [out, in] views in their stored dtype."""
        wb, wa = self._plan[module.name]
        return _read(self.aligned, wa, device), _read(self.base, wb, device)

    def _explain_non_finite(self, module: LoraModule, w_aligned: torch.Tensor, w_base: torch.Tensor) -> None:
        wb, wa = self._plan[module.name]
        ensure_finite(w_aligned, f"aligned weight '{wa.key}'")
        ensure_finite(w_base, f"base weight '{wb.key}'")
        raise RealignError(f"module '{module.name}': W_aligned - W_base overflows float32")

    def approx(self, module: LoraModule, b: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, float]:
        """(C B, ||V||_F), streaming V from the two checkpoints."""
        w_aligned, w_base = self._weights(module, device)
        projected, norm = method.approx_projection_of_difference(w_aligned, w_base, b)
        if not math.isfinite(norm):
            self._explain_non_finite(module, w_aligned, w_base)
        return projected, norm

    def matrix(self, module: LoraModule, device: torch.device) -> Matrix:
        w_aligned, w_base = self._weights(module, device)
        v = method.alignment_matrix(w_aligned, w_base)
        if not math.isfinite(frobenius_norm(v)):
            self._explain_non_finite(module, w_aligned, w_base)
        return v


class _AdapterAlignment:
    """V = s B A of an aligned LoRA adapter on base, kept in factored form."""

    kind = "adapter"

    def __init__(self, base: Checkpoint, aligned: Adapter, adapter: Adapter):
        self.aligned = aligned
        self._own: dict[str, LoraModule] = {}  # fine-tuned module name -> aligned adapter module
        base_names = WeightResolver(base.keys(), base.config, "base")
        aligned_names = {m.name for m in aligned.modules}
        for module in adapter.modules:
            _orient(module, base_names.weight_key(module.name), base, adapter.fan_in_fan_out)
            found = find_module(module.name, aligned_names, "aligned adapter")
            if found is None:
                continue  # untouched by alignment: V = 0
            own = aligned.module(found)
            if (own.d_in, own.d_out) != (module.d_in, module.d_out):
                raise RealignError(
                    f"module '{module.name}': aligned adapter is {own.d_out}x{own.d_in} but the adapter is "
                    f"{module.d_out}x{module.d_in}"
                )
            self._own[module.name] = own
        for name, tensor in _factors(aligned, aligned.modules):
            ensure_finite(tensor, f"aligned adapter tensor '{name}'")

    def matrix(self, module: LoraModule, device: torch.device) -> Matrix | None:
        own = self._own.get(module.name)
        if own is None:
            return None
        left = self.aligned.tensors[own.key_b].to(device, torch.float32) * own.scaling
        return LowRank(left, self.aligned.tensors[own.key_a].to(device, torch.float32))

    def approx(self, module: LoraModule, b: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, float]:
        v = self.matrix(module, device)
        norm = 0.0 if v is None else frobenius_norm(v)
        return (method.approx_projection(v, b, norm) if norm > 0 else None), norm


def _orient(module: LoraModule, key: str, checkpoint: Checkpoint, fan_in_fan_out: bool) -> _Weight:
    """Which way a weight is stored: the shape decides; a square weight follows fan_in_fan_out."""
    shape = checkpoint.shape(key)
    if not checkpoint.is_floating(key):
        raise RealignError(
            f"module '{module.name}': {checkpoint.role} weight '{key}' is not floating point (a quantized checkpoint?); "
            "Safe LoRA needs the unquantized weights"
        )
    out_in, in_out = (module.d_out, module.d_in), (module.d_in, module.d_out)
    if shape == out_in and (shape != in_out or not fan_in_fan_out):
        return _Weight(key, False)
    if shape == in_out:
        return _Weight(key, True)
    raise RealignError(
        f"module '{module.name}': {checkpoint.role} weight '{key}' has shape {shape}, but the adapter "
        f"expects {module.d_out}x{module.d_in}; was the adapter trained on this model?"
    )


def _read(checkpoint: Checkpoint, weight: _Weight, device: torch.device) -> torch.Tensor:
    tensor = checkpoint.read(weight.key).to(device)
    return tensor.T if weight.transposed else tensor


def _factors(adapter: Adapter, modules: list[LoraModule]):
    for module in modules:
        yield module.key_a, adapter.tensors[module.key_a]
        yield module.key_b, adapter.tensors[module.key_b]


def _validate_settings(settings: method.Settings, n_modules: int) -> None:
    if settings.projection not in (method.APPROX, method.EXACT):
        raise RealignError(f"--projection must be '{method.APPROX}' or '{method.EXACT}', got '{settings.projection}'")
    if settings.projection == method.EXACT and (settings.rank is None or settings.rank < 1):
        raise RealignError("--projection exact needs --rank K with K >= 1")
    if settings.projection == method.APPROX and settings.rank is not None:
        raise RealignError("--rank applies only to --projection exact")
    if settings.top_k is not None and settings.threshold is not None:
        raise RealignError("--threshold and --top-k are mutually exclusive")
    if settings.top_k is not None and not 1 <= settings.top_k <= n_modules:
        raise RealignError(f"--top-k must be between 1 and {n_modules} (the adapter's LoRA modules), got {settings.top_k}")
    if settings.threshold is not None and math.isnan(settings.threshold):
        raise RealignError("--threshold must be a number")


def _exact_bases(
    source, modules: list[LoraModule], rank: int, device: torch.device
) -> dict[str, tuple[torch.Tensor, float]]:
    """(U_k, ||V||_F) for every module whose V is non-zero: one batched decomposition per group
    of same-shaped modules, chunked to bound memory."""
    bases: dict[str, tuple[torch.Tensor, float]] = {}
    groups: dict[tuple[int, int], list[LoraModule]] = {}
    for module in modules:
        groups.setdefault((module.d_out, module.d_in), []).append(module)
    for (d_out, d_in), members in groups.items():
        if rank > min(d_out, d_in):
            raise RealignError(f"--rank {rank} exceeds the dimension min({d_out}, {d_in}) of the {d_out}x{d_in} modules")
        per_chunk = max(1, _EXACT_BATCH_BYTES // (8 * d_out * d_in))
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            dense: list[tuple[LoraModule, torch.Tensor, float]] = []
            for module in chunk:
                v = source.matrix(module, device)
                norm = 0.0 if v is None else frobenius_norm(v)
                if norm == 0.0:
                    continue
                if isinstance(v, LowRank):
                    u, sigma = lowrank_top_left_singular_vectors(v, rank)
                    _check_rank(module, sigma, rank)
                    bases[module.name] = (u, norm)
                else:
                    dense.append((module, v, norm))
            if dense:
                u, sigma = top_left_singular_vectors(torch.stack([v for _, v, _ in dense]), rank)
                for i, (module, _, norm) in enumerate(dense):
                    _check_rank(module, sigma[i], rank)
                    bases[module.name] = (u[i], norm)
    return bases


def _check_rank(module: LoraModule, sigma: torch.Tensor, rank: int) -> None:
    if not rank_is_defined(sigma, rank):
        raise RealignError(
            f"--rank {rank}: the alignment matrix of '{module.name}' has rank below {rank}, so its rank-{rank} "
            "projector is not defined; use a smaller --rank"
        )


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
    Selection: similarity <= threshold (default 0.5), or the `top_k` least similar modules.
    Returns the report; raises RealignError on bad input, before anything is written.
    """
    started = time.perf_counter()
    if top_k is None and threshold is None:
        threshold = 0.5
    settings = method.Settings(threshold=threshold, top_k=top_k, projection=projection, rank=rank)
    if not dry_run and out is None:
        raise RealignError("an output directory is needed (--out), or use --dry-run")
    dev = resolve_device(device)

    fine_tuned = Adapter.load(adapter, "adapter")
    _validate_settings(settings, len(fine_tuned.modules))
    base_ckpt = Checkpoint.open(base, "base")
    base_ckpt.validate()
    aligned_dir = resolve_local(aligned, "aligned")
    if (aligned_dir / ADAPTER_CONFIG).exists():
        source = _AdapterAlignment(base_ckpt, Adapter.load(str(aligned_dir), "aligned adapter"), fine_tuned)
    else:
        aligned_ckpt = Checkpoint(aligned_dir, "aligned")
        aligned_ckpt.validate()
        source = _FullAlignment(base_ckpt, aligned_ckpt, fine_tuned)
    inputs = [base_ckpt.directory, aligned_dir, fine_tuned.directory]
    if not dry_run:
        check_target(Path(out), force, inputs)
    for name, tensor in _factors(fine_tuned, fine_tuned.modules):
        ensure_finite(tensor, f"adapter tensor '{name}'")
    planned = time.perf_counter()

    bases: dict[str, tuple[torch.Tensor, float]] = {}
    if settings.projection == method.EXACT:
        bases = _exact_bases(source, fine_tuned.modules, settings.rank, dev)
    scores: list[method.ModuleScore] = []
    total = len(fine_tuned.modules)
    for i, module in enumerate(fine_tuned.modules):
        a = fine_tuned.tensors[module.key_a].to(dev)
        b = fine_tuned.tensors[module.key_b].to(dev)
        if settings.projection == method.EXACT:
            basis, norm = bases.get(module.name, (None, 0.0))
            projected = None if basis is None else method.exact_projection(basis, b)
        else:
            projected, norm = source.approx(module, b, dev)
        scores.append(method.score_module(module.name, a, b, projected, norm))
        if progress:
            progress(i + 1, total)
    scored_count = sum(s.similarity is not None for s in scores)
    if scored_count == 0:
        raise RealignError("no module has a defined similarity: base and aligned are equal on every adapted module, or the adapter is zero")
    if settings.top_k is not None and settings.top_k > scored_count:
        raise RealignError(f"--top-k {settings.top_k} exceeds the {scored_count} modules with a defined similarity")
    selected = method.select(scores, settings)
    computed = time.perf_counter()

    report = _report(base, aligned, adapter, source.kind, settings, dev, fine_tuned, scores, selected)
    if not dry_run:
        replaced = {
            fine_tuned.module(s.name).key_b: s.projected_b for s in scores if s.name in selected
        }
        report.output = str(Path(out))
        with atomic_directory(Path(out), force, inputs) as staging:
            write_adapter(fine_tuned, staging, replaced)
            report.timings = _timings(started, planned, computed)
            (staging / REPORT_FILE).write_text(report.to_json())
    report.timings = _timings(started, planned, computed)
    return report


def _timings(started: float, planned: float, computed: float) -> dict[str, float]:
    now = time.perf_counter()
    return {
        "plan_s": round(planned - started, 4),
        "compute_s": round(computed - planned, 4),
        "write_s": round(now - computed, 4),
        "total_s": round(now - started, 4),
    }


def score_summary(scores: list[method.ModuleScore], selected: set[str], passthrough: int) -> dict:
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


def _report(base, aligned, adapter, aligned_kind, settings, dev, fine_tuned, scores, selected) -> Report:
    modules = []
    for module, score in zip(fine_tuned.modules, scores):
        modules.append(
            {
                "name": module.name,
                "shape": [module.d_out, module.d_in],
                "rank": module.rank,
                "scaling": module.scaling,
                "similarity": score.similarity,
                "projected": module.name in selected,
                "alignment_norm": score.alignment_norm,
                "skipped": score.skip_reason,
            }
        )
    summary = score_summary(scores, selected, len(fine_tuned.passthrough))
    notes = []
    if settings.projection == method.APPROX:
        notes.append("C = V V^T / ||V||_F as in the paper and reference code; it is not an idempotent projector")
    return Report(
        command="safelora",
        inputs={"base": str(base), "aligned": str(aligned), "aligned_kind": aligned_kind, "adapter": str(adapter)},
        settings={
            "selection": settings.selection,
            "threshold": settings.threshold,
            "top_k": settings.top_k,
            "projection": settings.projection,
            "rank": settings.rank,
            "device": str(dev),
        },
        modules=modules,
        passthrough=[{"tensor": k, "reason": r} for k, r in fine_tuned.passthrough.items()],
        summary=summary,
        notes=notes,
    )
