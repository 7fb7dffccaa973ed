"""NLSR stage 2: the safety region of every factor of the reference adapter, from the Gram of
its lora_A outputs on the response tokens of calibration data (see math.py for the algebra)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ... import __version__
from ...calibration.examples import data_id, data_path
from ...calibration.grams import Tap, accumulate_grams, calibration_stats, load_calibration, logits_kwargs
from ...errors import RealignError
from ...io.adapter import Adapter, LoraModule
from ...io.checkpoint import resolve_local
from ...io.device import resolve_device
from ...io.identity import factors_digest
from ...io.models import apply_adapter, load_causal_lm, release
from ...io.placement import Placement, placement as parse_placement, placement_note
from ...io.names import find_module, in_forward_order, layer_prefix, natural_key
from ...io.output import check_target, save_safetensors_atomic
from ...progress import Progress, ticker
from ...report import Report
from . import math as method
from .pairs import check_patchable


MASKS_FORMAT = "realign-nlsr-masks"


MASKS_VERSION = "1"


@dataclass(frozen=True)
class RegionSettings:
    sparsity: float = 0.8
    mode: str = method.ONE_PASS
    max_response_tokens: int = 256
    max_samples: int | None = None
    batch_size: int = 8

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise RealignError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.mode not in method.REGION_MODES:
            raise RealignError(f"--regions must be one of {', '.join(method.REGION_MODES)}, got '{self.mode}'")
        if self.max_response_tokens < 1:
            raise RealignError("--max-response-tokens must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise RealignError("--max-samples must be at least 1")
        if self.batch_size < 1:
            raise RealignError("--batch-size must be at least 1")


@dataclass
class Regions:
    masks: dict[str, torch.Tensor]  # reference tensor key -> bool mask
    modules: list[dict]  # per module: q, eigen-gaps, mask densities
    calibration: dict  # examples, response tokens, truncated prompts, passes
    layout: str | None = None  # where accelerate put the model's modules, when it placed them


def _reference_model(model, adapter_dir: Path, reference: Adapter, tensors: dict[str, torch.Tensor]):
    """`model` (the base) + the reference adapter as a PEFT model (LoRA unmerged, as the
    reference runs it), its factors set to `tensors`; and the model's LoRA layer for each adapter
    module. The factors are real tensors even where accelerate offloaded the base weights (see
    `apply_adapter`), so they can be set here and between layers in sequential mode."""
    peft_model = apply_adapter(model, str(adapter_dir), merge=False)
    inner = peft_model.base_model.model
    layers = {name: m for name, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    located: dict[str, tuple[str, torch.nn.Module]] = {}
    for module in reference.modules:
        path = find_module(module.name, layers, "base model")
        if path is None:
            raise RealignError(f"module '{module.name}' of the reference adapter is not a LoRA layer of the base model")
        layer = layers[path]
        with torch.no_grad():
            for part, key in (("lora_A", module.key_a), ("lora_B", module.key_b)):
                weight = getattr(layer, part)["default"].weight
                if tuple(weight.shape) != tuple(tensors[key].shape):
                    raise RealignError(f"module '{module.name}': the base model's layer does not fit the adapter ({part})")
                weight.copy_(tensors[key])
        located[module.name] = (path, layer)
    return peft_model, located


def compute_regions(
    base: str,
    adapter_dir: Path,
    reference: Adapter,
    tensors: dict[str, torch.Tensor],
    calibration_spec: str,
    settings: RegionSettings,
    dev: torch.device,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> Regions:
    """Safety-region masks of every factor of the reference adapter (`tensors`, applied to base)."""
    return compute_regions_at(base, adapter_dir, reference, tensors, calibration_spec, settings, [settings.sparsity], dev,
                              progress, placement)[0]


def compute_regions_at(
    base: str,
    adapter_dir: Path,
    reference: Adapter,
    tensors: dict[str, torch.Tensor],
    calibration_spec: str,
    settings: RegionSettings,
    sparsities: Sequence[float],
    dev: torch.device,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> list[Regions]:
    """`compute_regions` at each of `sparsities` (settings.sparsity ignored). In one-pass mode the
    features do not depend on the sparsity, so one calibration pass serves them all; sequential
    mode projects each layer before the next one runs, so it takes one sparsity only."""
    if settings.mode == method.SEQUENTIAL and len(sparsities) != 1:
        raise ValueError("sequential regions depend on the sparsity: compute one at a time")
    base_model, tokenizer, _ = load_causal_lm(base, dev, role="base", placement=placement)
    try:
        model, located = _reference_model(base_model, adapter_dir, reference, tensors)
        return _regions_of(model, tokenizer, located, reference, tensors, calibration_spec, settings, sparsities, progress)
    finally:
        release(base_model)


def _regions_of(model, tokenizer, located: dict, reference: Adapter, tensors: dict[str, torch.Tensor], calibration_spec: str,
                settings: RegionSettings, sparsities: Sequence[float], progress: Progress | None) -> list[Regions]:
    calibration = load_calibration(model, tokenizer, calibration_spec, settings.max_samples, settings.max_response_tokens,
                                   "safety data")
    inner = model.base_model.model
    forward_kwargs = logits_kwargs(model, [layer.get_base_layer() for _, layer in located.values()])

    groups: dict[str, list[LoraModule]] = {}
    if settings.mode == method.SEQUENTIAL:
        for module in reference.modules:
            groups.setdefault(layer_prefix(located[module.name][0]), []).append(module)
        order = in_forward_order(groups)
    else:
        groups[""] = list(reference.modules)
        order = [""]
    tick = ticker(math.ceil(len(calibration.encoded) / settings.batch_size) * len(order), progress)

    masks: list[dict[str, torch.Tensor]] = [{} for _ in sparsities]
    rows: list[list[dict]] = [[] for _ in sparsities]
    for prefix in order:
        members = groups[prefix]
        taps = {m.name: Tap(located[m.name][1].lora_A["default"], "output") for m in members}
        stop = inner.get_submodule(prefix) if prefix else None
        grams = accumulate_grams(model, calibration, taps, settings.batch_size, stop_after=stop,
                                 forward_kwargs=forward_kwargs, on_batch=tick)
        for module in members:
            for i, sparsity in enumerate(sparsities):
                row, projected = _module_regions(module, tensors, grams[module.name].cpu(), sparsity, masks[i])
                rows[i].append(row)
            if settings.mode == method.SEQUENTIAL:  # later layers see this one projected
                layer = located[module.name][1]
                with torch.no_grad():
                    for part, value in zip(("lora_A", "lora_B"), projected):
                        weight = getattr(layer, part)["default"].weight
                        weight.copy_(value.to(weight.dtype))
    stats = calibration_stats(calibration, len(order))
    layout = placement_note(model)
    return [Regions(found, sorted(found_rows, key=lambda r: natural_key(r["name"])), dict(stats), layout)
            for found, found_rows in zip(masks, rows)]


def _module_regions(module: LoraModule, tensors, gram: torch.Tensor, sparsity: float, masks: dict) -> tuple[dict, tuple]:
    a, b = tensors[module.key_a], tensors[module.key_b]
    q_a = method.kept_directions(tuple(a.shape), sparsity)
    q_b = method.kept_directions(tuple(b.shape), sparsity)
    if min(q_a, q_b) < 1:
        raise RealignError(
            f"--sparsity {sparsity} keeps no singular direction for rank {module.rank} (q = int(sparsity * rank) = 0); "
            "raise the sparsity"
        )
    if not torch.isfinite(gram).all():
        raise RealignError(f"module '{module.name}': the calibration features overflow (Inf/NaN); check the model and data")
    proj_a = method.project_a(a, gram, q_a)
    proj_b = method.project_b(b, gram, q_b)
    masks[module.key_a] = method.top_mask(proj_a.factor, sparsity)
    masks[module.key_b] = method.top_mask(proj_b.factor, sparsity)
    row = {
        "name": module.name,
        "q": [q_a, q_b],
        "gap": [round(proj_a.relative_gap(q_a), 8), round(proj_b.relative_gap(q_b), 8)],
        "density": [float(masks[module.key_a].float().mean()), float(masks[module.key_b].float().mean())],
    }
    return row, (proj_a.factor, proj_b.factor)


def _masks_metadata(regions: Regions, settings: RegionSettings, reference_digest: str, calibration_id: str) -> dict[str, str]:
    return {
        "format": "pt",
        "realign": MASKS_FORMAT,
        "realign_masks_version": MASKS_VERSION,
        "realign_version": __version__,
        "reference_digest": reference_digest,
        "calibration": calibration_id,
        "settings": json.dumps({"sparsity": settings.sparsity, "regions": settings.mode,
                                "max_response_tokens": settings.max_response_tokens, "max_samples": settings.max_samples}),
        "calibration_stats": json.dumps(regions.calibration),
    }


def regions(
    base: str,
    reference: str,
    safety_data: str,
    out: str | Path,
    *,
    sparsity: float = 0.8,
    mode: str = method.ONE_PASS,
    max_response_tokens: int = 256,
    max_samples: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> Report:
    """Write the safety-region masks of the reference adapter to `out` (a safetensors file).
    `device_map` (auto, balanced, sequential) and `max_memory` ('0:70GiB,cpu:200GiB') spread
    the base model over devices with accelerate (docs/dispatch.md)."""
    return regions_at(base, reference, safety_data, {sparsity: out}, mode=mode, max_response_tokens=max_response_tokens,
                      max_samples=max_samples, batch_size=batch_size, device=device, force=force, progress=progress,
                      device_map=device_map, max_memory=max_memory)[sparsity]


def regions_at(
    base: str,
    reference: str,
    safety_data: str,
    outs: Mapping[float, str | Path],
    *,
    mode: str = method.ONE_PASS,
    max_response_tokens: int = 256,
    max_samples: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> dict[float, Report]:
    """`regions` at several sparsities ({sparsity: masks file}) from one calibration pass (one-pass
    mode): each file equals what `regions` writes at its sparsity. Its report's time is the shared
    call's."""
    started = time.perf_counter()
    safety_data = str(safety_data)
    if not outs:
        raise RealignError("no sparsity to compute regions at")
    all_settings = {s: RegionSettings(s, mode, max_response_tokens, max_samples, batch_size) for s in outs}
    for settings in all_settings.values():
        settings.validate()
    if mode == method.SEQUENTIAL and len(outs) > 1:
        raise RealignError("--regions sequential projects each layer at its sparsity before the next runs: one sparsity per run")
    dev = resolve_device(device)
    placed = parse_placement(device_map, max_memory, device)
    ref = Adapter.load(reference, "reference adapter")
    check_patchable(ref, "reference adapter")
    base_dir = resolve_local(base, "base")
    inputs = [base_dir, ref.directory, data_path(safety_data)]
    for out in outs.values():
        check_target(Path(out), force, inputs, kind="file")
    any_settings = next(iter(all_settings.values()))
    found_all = compute_regions_at(base, ref.directory, ref, ref.tensors, safety_data, any_settings, list(outs), dev, progress,
                                   placed)
    reference_digest = factors_digest(ref.tensors, ref.modules)
    calibration_id = data_id(safety_data, max_samples)
    reports = {}
    for (sparsity, out), found in zip(outs.items(), found_all):
        settings = all_settings[sparsity]
        report = _regions_report(base, reference, safety_data, settings, found)
        report.output = str(out)
        save_safetensors_atomic(Path(out), found.masks, _masks_metadata(found, settings, reference_digest, calibration_id), force,
                                inputs)
        reports[sparsity] = report
    for report in reports.values():
        report.timings = {"total_s": round(time.perf_counter() - started, 4)}
        if len(reports) > 1:
            report.notes.append(f"one calibration pass computed the regions at sparsities {', '.join(f'{s:g}' for s in outs)}")
    return reports


def regions_notes(found: Regions) -> list[str]:
    gaps = [g for row in found.modules for g in row["gap"]]
    notes = [found.layout] if found.layout else []
    small = sum(g < 1e-6 for g in gaps)
    if small:
        notes.append(
            f"{small} factor(s) have a near-degenerate eigenvalue pair at q (relative gap < 1e-6): their kept subspace, "
            "and so their mask, is fragile; small changes to the calibration data can move it"
        )
    if found.calibration["truncated_prompts"]:
        notes.append(f"{found.calibration['truncated_prompts']} prompt(s) were cut from the left to fit the model's context")
    return notes


def _regions_report(base, reference, safety_data, settings: RegionSettings, found: Regions) -> Report:
    gaps = [g for row in found.modules for g in row["gap"]]
    densities = [d for row in found.modules for d in row["density"]]
    return Report(
        command="nlsr regions",
        inputs={"base": str(base), "reference": str(reference), "safety_data": str(safety_data)},
        settings=asdict(settings),
        modules=found.modules,
        summary={
            "modules": len(found.modules),
            "mask_density": sum(densities) / len(densities),
            "min_gap": min(gaps),
            **found.calibration,
        },
        notes=regions_notes(found),
    )
