"""Safe LoRA on a FULL fine-tuned checkpoint: dW = W_finetuned - W_aligned per target module.

C dW = V (V^T dW) / ||V||_F is dense here, so modules are processed in batches of one shape on
the chosen device, a bounded number of bytes at a time, and nothing larger than a batch is ever
held. Two passes: the first scores every module, the second (for the selected modules only)
recomputes C dW and writes it, either as a full patched checkpoint (the fine-tuned shards
copied, the patched tensors written over their own bytes) or, with `as_adapter`, as a PEFT LoRA
adapter of the patched delta extracted by a truncated SVD.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from ..checks import ensure_finite
from ..device import resolve_device
from ..errors import RealignError
from ..io.adapter import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, Adapter
from ..io.checkpoint import CONFIG, SAFETENSORS_INDEX, Checkpoint, resolve_local
from ..io.names import PEFT_PREFIX, WeightResolver, find_module
from ..io.output import atomic_directory, check_target
from ..linalg import (
    LowRank,
    frobenius_norm,
    gram_apply,
    lowrank_top_left_singular_vectors,
    randomized_top_left_singular_vectors,
    rank_is_defined,
    top_left_singular_vectors,
)
from ..methods import safelora as method
from ..report import Report
from ..targets import ALL_LINEAR, find_targets
from .safelora import _timings, _validate_settings, score_summary

REPORT_FILE = "realign_report.json"
# Upper bound on the float32 matrices of one batch (about four per module: V, dW, C dW and a
# temporary); a 4096 x 11008 module alone is 180 MB, so a 7B model runs one or two at a time.
BATCH_BYTES = 1 << 30
# Files of a training run that do not belong in a patched model directory.
_NOT_COPIED = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin", REPORT_FILE}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FullModule:
    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # [out, in]
    transposed: bool  # stored [in, out] (GPT-2 Conv1D)
    key_ft: str
    key_aligned: str | None  # None when ALIGNED is an adapter: W_aligned = W_base + its delta
    key_base: str
    aligned_lora: object | None = None  # the aligned adapter's LoraModule on this module, if any


class FullSource:
    """Base, aligned (checkpoint or adapter on base) and the full fine-tuned checkpoint, read one
    module at a time."""

    def __init__(self, base: str, aligned: str, finetuned: str, targets: tuple[str, ...]):
        self.base = Checkpoint.open(base, "base")
        finetuned_dir = resolve_local(finetuned, "fine-tuned")
        if (finetuned_dir / ADAPTER_CONFIG).exists():
            raise RealignError(f"fine-tuned '{finetuned}' is a PEFT adapter; pass it with --adapter")
        self.finetuned = Checkpoint(finetuned_dir, "fine-tuned")
        aligned_dir = resolve_local(aligned, "aligned")
        self.aligned_adapter: Adapter | None = None
        self.aligned: Checkpoint | None = None
        if (aligned_dir / ADAPTER_CONFIG).exists():
            self.aligned_adapter = Adapter.load(str(aligned_dir), "aligned adapter")
        else:
            self.aligned = Checkpoint(aligned_dir, "aligned")
        self.directories = [self.base.directory, aligned_dir, self.finetuned.directory]
        for checkpoint in (self.base, self.aligned, self.finetuned):
            if checkpoint is not None:
                checkpoint.validate()
        self.modules = self._plan(targets)
        self.kind = "adapter" if self.aligned_adapter is not None else "checkpoint"

    def _plan(self, targets: tuple[str, ...]) -> list[FullModule]:
        found = find_targets(_meta_model(self.finetuned), targets)
        resolvers = {ckpt.role: WeightResolver(ckpt.keys(), ckpt.config, ckpt.role) for ckpt in (self.base, self.aligned, self.finetuned) if ckpt}
        aligned_names = {m.name for m in self.aligned_adapter.modules} if self.aligned_adapter else set()
        modules = []
        for target in found:
            keys = {}
            for ckpt in (self.base, self.aligned, self.finetuned):
                if ckpt is None:
                    continue
                key = resolvers[ckpt.role].weight_key(target.path)
                stored = tuple(reversed(target.shape)) if target.transposed else target.shape
                if ckpt.shape(key) != stored:
                    raise RealignError(f"module '{target.path}': {ckpt.role} weight '{key}' has shape {ckpt.shape(key)}, "
                                       f"expected {stored}; are the checkpoints the same architecture?")
                if not ckpt.is_floating(key):
                    raise RealignError(f"module '{target.path}': {ckpt.role} weight '{key}' is not floating point (quantized?)")
                keys[ckpt.role] = key
            lora = None
            if self.aligned_adapter is not None:
                hit = find_module(target.path, aligned_names, "aligned adapter")
                lora = self.aligned_adapter.module(hit) if hit else None
                if lora is not None and (lora.d_out, lora.d_in) != target.shape:
                    raise RealignError(f"module '{target.path}': aligned adapter is {lora.d_out}x{lora.d_in}, the model {target.shape}")
            modules.append(FullModule(target.path, target.shape, target.transposed, keys["fine-tuned"], keys.get("aligned"),
                                      keys["base"], lora))
        return modules

    def _read(self, checkpoint: Checkpoint, key: str, module: FullModule, device: torch.device) -> torch.Tensor:
        w = checkpoint.read(key).to(device, torch.float32)
        return w.T if module.transposed else w

    def alignment(self, module: FullModule, device: torch.device) -> LowRank | torch.Tensor | None:
        """V: dense (checkpoint), low-rank (adapter) or None (the adapter leaves the module alone)."""
        if self.aligned_adapter is not None:
            lora = module.aligned_lora
            if lora is None:
                return None
            left = self.aligned_adapter.tensors[lora.key_b].to(device, torch.float32) * lora.scaling
            return LowRank(left, self.aligned_adapter.tensors[lora.key_a].to(device, torch.float32))
        return self._read(self.aligned, module.key_aligned, module, device) - self._read(self.base, module.key_base, module, device)

    def aligned_weight(self, module: FullModule, device: torch.device) -> torch.Tensor:
        if self.aligned is not None:
            return self._read(self.aligned, module.key_aligned, module, device)
        w = self._read(self.base, module.key_base, module, device)
        v = self.alignment(module, device)
        return w if v is None else w.addmm_(v.left, v.right)

    def update(self, module: FullModule, device: torch.device) -> torch.Tensor:
        """dW = W_finetuned - W_aligned, float32 [out, in]."""
        dw = self._read(self.finetuned, module.key_ft, module, device).sub_(self.aligned_weight(module, device))
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
        alignments = [self.source.alignment(m, dev) for m in batch]
        norms = [0.0 if v is None else frobenius_norm(v) for v in alignments]
        for module, norm in zip(batch, norms):
            if not math.isfinite(norm):
                raise RealignError(f"module '{module.name}': W_aligned - W_base is not finite")
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
            if not rank_is_defined(sigma, k):
                raise RealignError(f"--rank {k}: the alignment matrix of '{module.name}' has rank below {k}; use a smaller --rank")
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
    ft = source.finetuned
    for path in ft.directory.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED:
            shutil.copyfile(path, staging / path.name)
    done = 0
    for batch in _batches(selected, _dense_bytes):
        projected, _, _ = projector.project(batch)
        for module, delta in zip(batch, projected):
            patched = source.aligned_weight(module, projector.device).add_(delta)
            dtype = ft.dtype(module.key_ft)
            tensor = (patched.T if module.transposed else patched).to("cpu", dtype).contiguous()
            ensure_finite(tensor, f"patched weight '{module.key_ft}' in {dtype}")
            start, end = ft.byte_range(module.key_ft)
            raw = tensor.view(torch.uint8).numpy()
            if raw.nbytes != end - start:  # pragma: no cover - same dtype and shape by construction
                raise AssertionError(f"{module.key_ft}: {raw.nbytes} bytes for a {end - start}-byte slot")
            with open(staging / ft.file_of(module.key_ft), "r+b") as handle:
                handle.seek(start)
                handle.write(raw.tobytes())
        done += len(batch)
        if progress:
            progress(done, len(selected))
    shards = ft.files()
    return {"shards": len(shards), "shards_rewritten": len({ft.file_of(m.key_ft) for m in selected}),
            "index": (ft.directory / SAFETENSORS_INDEX).exists()}


def _write_adapter(source: FullSource, projector: Projector, selected: set[str], rank: int, staging: Path,
                   aligned_spec: str, progress: Progress | None) -> dict[str, float | None]:
    """A rank-`rank` LoRA adapter of W_patched - W_aligned (C dW where selected, dW elsewhere),
    from the top singular vectors of each delta (randomized subspace iteration: seconds per 7B
    module where an exact decomposition takes a minute on CPU); returns each module's relative
    Frobenius error, measured on the factors written."""
    tensors: dict[str, torch.Tensor] = {}
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
        basis = randomized_top_left_singular_vectors(stacked, rank)
        right = basis.mT @ stacked
        residual = stacked - basis @ right
        for i, module in enumerate(batch):
            total = float(stacked[i].square().sum(-1).double().sum())
            errors[module.name] = None if total == 0 else math.sqrt(float(residual[i].square().sum(-1).double().sum()) / total)
            if total == 0:
                continue  # nothing to carry: the module is left out of the adapter
            key = PEFT_PREFIX + module.name
            tensors[f"{key}.lora_A.weight"] = right[i].contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = basis[i].contiguous().cpu()
        done += len(batch)
        if progress:
            progress(done, len(source.modules))
    kept = [m.name for m in source.modules if errors[m.name] is not None]
    if not kept:
        raise RealignError("the fine-tuned checkpoint equals the aligned one on every target module: no adapter to write")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(aligned_spec),
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": any(m.transposed for m in source.modules), "target_modules": kept, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, staging / ADAPTER_SAFETENSORS, metadata={"format": "pt"})
    return errors


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
    started = time.perf_counter()
    if top_k is None and threshold is None:
        threshold = 0.5
    settings = method.Settings(threshold=threshold, top_k=top_k, projection=projection, rank=rank)
    if not dry_run and out is None:
        raise RealignError("an output directory is needed (--out), or use --dry-run")
    if as_adapter and (adapter_rank is None or adapter_rank < 1):
        raise RealignError("--as-adapter needs --adapter-rank R with R >= 1 (the rank of the extracted LoRA)")
    if adapter_rank is not None and not as_adapter:
        raise RealignError("--adapter-rank applies only with --as-adapter")
    if not targets:
        raise RealignError("--targets needs at least one module name (e.g. q_proj,v_proj) or all-linear")
    dev = resolve_device(device)
    source = FullSource(base, aligned, finetuned, targets)
    _validate_settings(settings, len(source.modules))
    if not dry_run:
        check_target(Path(out), force, source.directories)
        if not as_adapter and not source.finetuned.is_safetensors:
            raise RealignError("the fine-tuned checkpoint is in .bin files; a patched checkpoint is written only from safetensors "
                               "(convert it, or use --as-adapter)")
    planned = time.perf_counter()

    scores = score(source, settings, dev, progress)
    scored = [s for s in scores if s.similarity is not None]
    if not scored:
        raise RealignError("no module has a defined similarity: base and aligned, or aligned and fine-tuned, are equal on every target")
    if settings.top_k is not None and settings.top_k > len(scored):
        raise RealignError(f"--top-k {settings.top_k} exceeds the {len(scored)} modules with a defined similarity")
    selected = method.select(scores, settings)
    computed = time.perf_counter()

    report = full_report(base, aligned, finetuned, source, settings, dev, scores, selected)
    if not dry_run:
        projector = Projector(source, settings, dev)
        report.output = str(Path(out))
        with atomic_directory(Path(out), force, source.directories) as staging:
            if as_adapter:
                errors = _write_adapter(source, projector, selected, adapter_rank, staging, aligned, progress)
                for row in report.modules:
                    row["reconstruction_error"] = errors[row["name"]]
                measured = [e for e in errors.values() if e is not None]
                report.summary.update(output_kind="adapter", adapter_rank=adapter_rank,
                                      max_reconstruction_error=max(measured), mean_reconstruction_error=sum(measured) / len(measured))
                report.notes.append("the adapter holds a rank-R truncated SVD of W_patched - W_aligned per module (randomized "
                                    "subspace iteration, seeded); reconstruction_error = ||delta - B A||_F / ||delta||_F, measured")
            else:
                layout = _write_checkpoint(source, projector, [m for m in source.modules if m.name in selected], staging, progress)
                report.summary.update(output_kind="checkpoint", **layout)
            report.timings = _timings(started, planned, computed)
            (staging / REPORT_FILE).write_text(report.to_json())
    report.timings = _timings(started, planned, computed)
    return report


def full_report(base, aligned, finetuned, source: FullSource, settings: method.Settings, dev, scores, selected) -> Report:
    modules = [{"name": m.name, "shape": list(m.shape), "rank": None, "scaling": None, "similarity": s.similarity,
                "projected": m.name in selected, "alignment_norm": s.alignment_norm, "skipped": s.skip_reason}
               for m, s in zip(source.modules, scores)]
    summary = score_summary(scores, selected, 0)
    notes = ["dW = W_finetuned - W_aligned in float32; C dW computed densely per module"]
    if settings.projection == method.APPROX:
        notes.append("C = V V^T / ||V||_F as in the paper and reference code; it is not an idempotent projector")
    return Report(
        command="safelora",
        inputs={"base": str(base), "aligned": str(aligned), "aligned_kind": source.kind, "finetuned": str(finetuned)},
        settings={"selection": settings.selection, "threshold": settings.threshold, "top_k": settings.top_k,
                  "projection": settings.projection, "rank": settings.rank, "device": str(dev)},
        modules=modules,
        summary=summary,
        notes=notes,
    )
