"""Safe LoRA on a FULL fine-tuned checkpoint: dW = W_finetuned - W_aligned per target module.

C dW = V (V^T dW) / ||V||_F is dense here, so modules are processed in batches of one shape on
the chosen device, a bounded number of bytes at a time, and nothing larger than a batch is ever
held. Two passes: the first scores every module, the second (for the selected modules only)
recomputes C dW and writes it, either as a full patched checkpoint (the fine-tuned shards
copied, the patched tensors written over their own bytes) or, with `as_adapter`, as a PEFT LoRA
adapter of the patched delta extracted by a truncated SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ...errors import RealignError, ensure_finite
from ...io.adapter import ADAPTER_CONFIG
from ...io.adapter_writer import lora_config, write_lora
from ...io.checkpoint import CONFIG, Checkpoint, resolve_local
from ...io.device import resolve_device
from ...io.names import WeightResolver
from ...io.shards import copy_checkpoint, layout, write_over
from ...io.targets import ALL_LINEAR, find_targets
from ...linalg import (
    LowRank,
    frobenius_norm,
    gram_apply,
    lowrank_top_left_singular_vectors,
    top_left_singular_vectors,
    truncated_factors,
)
from ...progress import Progress
from ...report import Report
from ..alignment import Alignment, StoredWeight, orient, read_weight
from ..merging import check_output_options
from ..patch import run
from . import math as method
from .adapter import check_rank
from .scoring import SafeLoraPatch, check_scored, make_settings, module_row, validate

# Upper bound on the float32 matrices of one batch (about four per module: V, dW, C dW and a
# temporary); a 4096 x 11008 module alone is 180 MB, so a 7B model runs one or two at a time.
BATCH_BYTES = 1 << 30


@dataclass(frozen=True)
class FullModule:
    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # [out, in]
    finetuned: StoredWeight


class FullSource:
    """Base, aligned (checkpoint or adapter on base) and the full fine-tuned checkpoint, read one
    module at a time."""

    def __init__(self, base: str, aligned: str, finetuned: str, targets: tuple[str, ...]):
        base_ckpt = Checkpoint.open(base, "base")
        finetuned_dir = resolve_local(finetuned, "fine-tuned")
        if (finetuned_dir / ADAPTER_CONFIG).exists():
            raise RealignError(f"fine-tuned '{finetuned}' is a PEFT adapter; pass it with --adapter")
        self.finetuned = Checkpoint(finetuned_dir, "fine-tuned")
        self.alignment = Alignment(base_ckpt, aligned)
        base_ckpt.validate()
        self.finetuned.validate()
        self.directories = [*self.alignment.directories, self.finetuned.directory]
        self.modules = self._plan(targets)
        self.kind = self.alignment.kind

    def _plan(self, targets: tuple[str, ...]) -> list[FullModule]:
        resolver = WeightResolver(self.finetuned.keys(), self.finetuned.config, "fine-tuned")
        modules = []
        for target in find_targets(_meta_model(self.finetuned), targets):
            self.alignment.plan(target.path, target.shape, target.transposed)
            weight = orient(self.finetuned, resolver.weight_key(target.path), target.path, target.shape, target.transposed)
            modules.append(FullModule(target.path, target.shape, weight))
        return modules

    def update(self, module: FullModule, device: torch.device) -> torch.Tensor:
        """dW = W_finetuned - W_aligned, float32 [out, in]."""
        dw = read_weight(self.finetuned, module.finetuned, device, torch.float32).sub_(self.alignment.aligned_weight(module.name, device))
        ensure_finite(dw, f"W_finetuned - W_aligned of '{module.name}'")
        return dw


def _meta_model(checkpoint: Checkpoint):
    """The model's module tree without weights (meta device), to find its linear layers."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    if not (checkpoint.directory / CONFIG).exists():
        raise RealignError(f"{checkpoint.role} '{checkpoint.directory}' has no {CONFIG}; cannot tell its linear layers")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(checkpoint.directory)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise RealignError(f"cannot read the architecture of {checkpoint.role} '{checkpoint.directory}': {str(exc).splitlines()[0]}") from None


def _batches(modules: list[FullModule], per_module_bytes: Callable[[FullModule], int]) -> Iterator[list[FullModule]]:
    """Same-shaped modules in groups whose working set stays under BATCH_BYTES (at least one)."""
    groups: dict[tuple[int, int], list[FullModule]] = {}
    for module in modules:
        groups.setdefault(module.shape, []).append(module)
    for members in groups.values():
        per_batch = max(1, BATCH_BYTES // per_module_bytes(members[0]))
        for start in range(0, len(members), per_batch):
            yield members[start : start + per_batch]


def _dense_bytes(module: FullModule) -> int:
    d_out, d_in = module.shape
    return 4 * (4 * d_out * d_in + min(d_out, d_in) ** 2)


class Projector:
    """C dW for batches of modules, under the approx or exact projection."""

    def __init__(self, source: FullSource, settings: method.Settings, device: torch.device):
        self.source, self.settings, self.device = source, settings, device

    def project(self, batch: list[FullModule], dw: torch.Tensor | None = None) -> tuple[list[torch.Tensor | None], torch.Tensor, list[float]]:
        """(C dW or None where V = 0, dW stacked, ||V||_F per module); dW is read unless given."""
        dev = self.device
        if dw is None:
            dw = torch.stack([self.source.update(m, dev) for m in batch])
        alignments = [self.source.alignment.matrix(m.name, dev) for m in batch]
        norms = [0.0 if v is None else frobenius_norm(v) for v in alignments]
        projected: list[torch.Tensor | None] = [None] * len(batch)
        live = [i for i, n in enumerate(norms) if n > 0]
        if not live:
            return projected, dw, norms
        if self.settings.projection == method.EXACT:
            for i, p in zip(live, self._exact([alignments[i] for i in live], [batch[i] for i in live], dw[live])):
                projected[i] = p
        elif isinstance(alignments[live[0]], LowRank):
            for i in live:
                projected[i] = gram_apply(alignments[i], dw[i]).div_(norms[i])
        else:
            stacked = torch.stack([alignments[i] for i in live])
            del alignments
            # indexing copies; most batches have V != 0 everywhere and need no copy of dW
            sub = dw if len(live) == len(batch) else dw[live]
            result = method.dense_projection(stacked, sub, torch.tensor([norms[i] for i in live]))
            for j, i in enumerate(live):
                projected[i] = result[j]
        return projected, dw, norms

    def _exact(self, alignments: list, modules: list[FullModule], dw: torch.Tensor) -> list[torch.Tensor]:
        k = self.settings.rank
        if k > min(modules[0].shape):
            raise RealignError(f"--rank {k} exceeds the dimension min{modules[0].shape} of module '{modules[0].name}'")
        if isinstance(alignments[0], LowRank):
            pairs = [lowrank_top_left_singular_vectors(v, k) for v in alignments]
            bases, sigmas = torch.stack([u for u, _ in pairs]), [s for _, s in pairs]
        else:
            bases, sigma = top_left_singular_vectors(torch.stack(alignments), k)
            sigmas = list(sigma)
        for module, sigma in zip(modules, sigmas):
            check_rank(module.name, sigma, k)
        return list(method.basis_projection(bases, dw))


def score(source: FullSource, settings: method.Settings, device: torch.device, progress: Progress | None = None) -> list[method.ModuleScore]:
    """Pass 1: every module's similarity (C dW is not kept)."""
    projector = Projector(source, settings, device)
    scores: dict[str, method.ModuleScore] = {}
    for batch in _batches(source.modules, _dense_bytes):
        projected, dw, norms = projector.project(batch)
        # one module at a time on views: stacking or indexing would copy whole matrices
        by_index = {i: method.dense_cosines(dw[i : i + 1], p.unsqueeze(0))[0] for i, p in enumerate(projected) if p is not None}
        for i, module in enumerate(batch):
            if projected[i] is None:
                scores[module.name] = method.ModuleScore(module.name, None, None, norms[i], "no alignment change on this module (V = 0)")
            elif by_index[i] is None:
                scores[module.name] = method.ModuleScore(module.name, None, None, norms[i], "the fine-tuned weight equals the aligned one (dW = 0)")
            else:
                scores[module.name] = method.ModuleScore(module.name, by_index[i], None, norms[i])
        del projected, dw
        if progress:
            progress(len(scores), len(source.modules))
    return [scores[m.name] for m in source.modules]


def _write_checkpoint(source: FullSource, projector: Projector, selected: list[FullModule], staging: Path,
                      progress: Progress | None) -> dict:
    """The fine-tuned directory with W_aligned + C dW written over each selected weight."""
    copy_checkpoint(source.finetuned, staging, left_out=[m.finetuned.key for m in selected])  # written once, below
    done = 0
    for batch in _batches(selected, _dense_bytes):
        projected, _, _ = projector.project(batch)
        for module, delta in zip(batch, projected):
            patched = source.alignment.aligned_weight(module.name, projector.device).add_(delta)
            write_over(source.finetuned, staging, module.finetuned.key, patched.T if module.finetuned.transposed else patched)
        done += len(batch)
        if progress:
            progress(done, len(selected))
    return layout(source.finetuned, [m.finetuned.key for m in selected])


def _write_adapter(source: FullSource, projector: Projector, selected: set[str], rank: int, staging: Path,
                   aligned_spec: str, progress: Progress | None) -> dict[str, float | None]:
    """A rank-`rank` LoRA adapter of W_patched - W_aligned (C dW where selected, dW elsewhere),
    from the top singular vectors of each delta (randomized subspace iteration: seconds per 7B
    module where an exact decomposition takes a minute on CPU); returns each module's relative
    Frobenius error, measured on the factors written."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float | None] = {}
    for module in source.modules:
        if rank > min(module.shape):
            raise RealignError(f"--rank {rank} exceeds the dimension min{module.shape} of module '{module.name}'")
    done = 0
    for batch in _batches(source.modules, _dense_bytes):
        stacked = torch.stack([source.update(m, projector.device) for m in batch])
        wanted = [i for i, m in enumerate(batch) if m.name in selected]
        if wanted:
            projected, _, _ = projector.project([batch[i] for i in wanted], stacked[wanted])
            for i, p in zip(wanted, projected):
                stacked[i] = p  # selected modules have V != 0, so p is a tensor
        right, basis, batch_errors = truncated_factors(stacked, rank)
        for i, module in enumerate(batch):
            errors[module.name] = batch_errors[i]
            if batch_errors[i] is not None:  # a module with nothing to carry is left out of the adapter
                factors[module.name] = (right[i], basis[i])
        done += len(batch)
        if progress:
            progress(done, len(source.modules))
    if not factors:
        raise RealignError("the fine-tuned checkpoint equals the aligned one on every target module: no adapter to write")
    conv1d = any(m.finetuned.transposed for m in source.modules)
    write_lora(staging, lora_config(list(factors), rank, rank, base_model=str(aligned_spec), fan_in_fan_out=conv1d), factors)
    return errors


class FullPatch(SafeLoraPatch):
    notes = ("dW = W_finetuned - W_aligned in float32; C dW computed densely per module",)

    def __init__(self, base: str, aligned: str, finetuned: str, targets: tuple[str, ...], settings: method.Settings,
                 as_adapter: bool, adapter_rank: int | None, device: torch.device, progress: Progress | None):
        self.names = {"base": str(base), "aligned": str(aligned), "finetuned": str(finetuned)}
        self.settings, self.device, self.progress = settings, device, progress
        self.as_adapter, self.adapter_rank = as_adapter, adapter_rank
        self.source = FullSource(base, aligned, finetuned, targets)
        self.kind = self.source.kind
        validate(settings, len(self.source.modules))

    def inputs(self) -> list[Path]:
        return self.source.directories

    def score(self, progress: Progress | None) -> list[method.ModuleScore]:
        scores = score(self.source, self.settings, self.device, progress)
        check_scored(scores, self.settings, "no module has a defined similarity: base and aligned, or aligned and fine-tuned, "
                                            "are equal on every target")
        return scores

    def report(self, scores: list[method.ModuleScore], selected: set[str]) -> Report:
        rows = [module_row(m.name, m.shape, None, None, s, selected) for m, s in zip(self.source.modules, scores)]
        return self.safelora_report(scores, selected, rows, {})

    def write(self, staging: Path, scores: list[method.ModuleScore], selected: set[str], report: Report) -> None:
        projector = Projector(self.source, self.settings, self.device)
        if self.as_adapter:
            errors = _write_adapter(self.source, projector, selected, self.adapter_rank, staging, self.names["aligned"], self.progress)
            for row in report.modules:
                row["reconstruction_error"] = errors[row["name"]]
            measured = [e for e in errors.values() if e is not None]
            report.summary.update(output_kind="adapter", adapter_rank=self.adapter_rank,
                                  max_reconstruction_error=max(measured), mean_reconstruction_error=sum(measured) / len(measured))
            report.notes.append("the adapter holds a rank-R truncated SVD of W_patched - W_aligned per module (randomized "
                                "subspace iteration, seeded); reconstruction_error = ||delta - B A||_F / ||delta||_F, measured")
        else:
            chosen = [m for m in self.source.modules if m.name in selected]
            report.summary.update(output_kind="checkpoint", **_write_checkpoint(self.source, projector, chosen, staging, self.progress))


def safelora_full(
    base: str,
    aligned: str,
    finetuned: str,
    out: str | Path | None = None,
    *,
    targets: tuple[str, ...] = (ALL_LINEAR,),
    threshold: float | None = None,
    top_k: int | None = None,
    projection: str = method.APPROX,
    rank: int | None = None,
    as_adapter: bool = False,
    adapter_rank: int | None = None,
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Safe LoRA on a full fine-tuned checkpoint FINETUNED of ALIGNED. Writes a patched
    checkpoint to `out` (same shards, index and side files), or with `as_adapter` a PEFT LoRA
    adapter of rank `adapter_rank` on ALIGNED. Raises RealignError before writing anything."""
    settings = make_settings(threshold, top_k, projection, rank)

    def plan() -> FullPatch:
        check_output_options(as_adapter, adapter_rank)
        if not targets:
            raise RealignError("--targets needs at least one module name (e.g. q_proj,v_proj) or all-linear")
        patch = FullPatch(base, aligned, finetuned, targets, settings, as_adapter, adapter_rank, resolve_device(device), progress)
        if not dry_run and not as_adapter and not patch.source.finetuned.is_safetensors:
            raise RealignError("the fine-tuned checkpoint is in .bin files; a patched checkpoint is written only from safetensors "
                               "(convert it, or use --as-adapter)")
        return patch

    return run(plan, out, dry_run=dry_run, force=force, progress=progress)
