"""`realign nlsr`: amplify the aligned adapter, find its safety regions on calibration data, and
transplant them into the fine-tuned adapter where its safety region drifted most.

Three stages with files between them (reference adapter, masks file), and the one-shot command
that runs them in memory; the staged and one-shot results are identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .. import __version__
from ..checks import ensure_finite
from ..data import load_examples
from ..device import resolve_device
from ..errors import RealignError
from ..features import Tap, accumulate_grams, context_length, encode_calibration, logits_kwargs
from ..io.adapter import Adapter, LoraModule, write_adapter
from ..io.checkpoint import resolve_local
from ..io.names import find_module, in_forward_order, layer_prefix, natural_key
from ..io.output import atomic_directory, check_target, read_tagged_safetensors, save_safetensors_atomic
from ..methods import nlsr as method
from ..report import Report

REPORT_FILE = "realign_report.json"
MASKS_FORMAT = "realign-nlsr-masks"
MASKS_VERSION = "1"
DEFAULT_AMPLIFY = 3.24  # the reference code's 1.8 on each factor

Progress = Callable[[int, int], None]


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


def _validate_selection(selection: method.Selection) -> None:
    if selection.rule not in method.SELECTIONS:
        raise RealignError(f"--selection must be one of {', '.join(method.SELECTIONS)}, got '{selection.rule}'")
    if selection.direction not in method.DIRECTIONS:
        raise RealignError(f"--direction must be one of {', '.join(method.DIRECTIONS)}, got '{selection.direction}'")
    if not 0.0 <= selection.prune_rate <= 1.0:
        raise RealignError(f"--prune-rate must be in [0, 1], got {selection.prune_rate}")
    if not 0.0 <= selection.epsilon <= 1.0:
        raise RealignError(f"--epsilon must be in [0, 1], got {selection.epsilon}")
    if math.isnan(selection.tau):
        raise RealignError("--tau must be a number")


def _validate_amplify(factor: float) -> None:
    if not (factor > 0 and math.isfinite(factor)):
        raise RealignError(f"--amplify must be a positive number, got {factor}")


# -- adapters ---------------------------------------------------------------------------------


def _check_patchable(adapter: Adapter, role: str) -> None:
    """NLSR needs every LoRA tensor to be a linear module's factor: regions come from forward
    hooks on linear LoRA layers, and the patch copies factor entries."""
    for key, why in adapter.passthrough.items():
        if "embedding LoRA" in why or "convolution LoRA" in why:
            raise RealignError(f"{role} has {why.split(' (')[0]} ('{key}'); NLSR handles linear LoRA modules only")
    for module in adapter.modules:
        for key in (module.key_a, module.key_b):
            ensure_finite(adapter.tensors[key], f"{role} tensor '{key}'")


_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")


def _check_same_layout(reference: Adapter, fine_tuned: Adapter, reference_role: str) -> dict[str, LoraModule]:
    """NLSR's setting: the fine-tuned adapter resumed training from the aligned one, so both
    share modules, ranks and scaling. Returns fine-tuned module name -> reference module."""
    for key in _CONFIG_KEYS:
        ours, theirs = reference.config.get(key), fine_tuned.config.get(key)
        if (ours or None) != (theirs or None):
            raise RealignError(
                f"the {reference_role} and the fine-tuned adapter differ in {key} ({ours!r} vs {theirs!r}); NLSR needs "
                "a fine-tuned adapter that continued training from the aligned one"
            )
    names = {m.name for m in reference.modules}
    pairs: dict[str, LoraModule] = {}
    for module in fine_tuned.modules:
        found = find_module(module.name, names, reference_role)
        if found is None:
            raise RealignError(f"module '{module.name}' of the fine-tuned adapter is not in the {reference_role}")
        own = reference.module(found)
        if (own.rank, own.d_out, own.d_in) != (module.rank, module.d_out, module.d_in):
            raise RealignError(
                f"module '{module.name}': the {reference_role} has rank {own.rank} ({own.d_out}x{own.d_in}) and the "
                f"fine-tuned adapter rank {module.rank} ({module.d_out}x{module.d_in})"
            )
        pairs[module.name] = own
    if len(pairs) != len(reference.modules):
        extra = sorted(names - {p.name for p in pairs.values()}, key=natural_key)
        raise RealignError(f"the {reference_role} has modules the fine-tuned adapter lacks (e.g. '{extra[0]}')")
    return pairs


def _load_pair(reference: str, role: str, adapter: str) -> tuple[Adapter, Adapter, dict[str, LoraModule]]:
    """The reference (or aligned) adapter and the fine-tuned one, both patchable, with the same
    layout; and the fine-tuned module name -> reference module map."""
    ref = Adapter.load(reference, role)
    _check_patchable(ref, role)
    fine_tuned = Adapter.load(adapter, "adapter")
    _check_patchable(fine_tuned, "adapter")
    return ref, fine_tuned, _check_same_layout(ref, fine_tuned, role)


def amplified_tensors(aligned: Adapter, factor: float) -> dict[str, torch.Tensor]:
    """The reference adapter's factors: every module's update scaled by `factor`."""
    replaced = {}
    for module in aligned.modules:
        a, b = method.amplify(aligned.tensors[module.key_a], aligned.tensors[module.key_b], factor)
        replaced[module.key_a], replaced[module.key_b] = a, b
    return replaced


def factors_digest(tensors: dict[str, torch.Tensor], modules: list[LoraModule]) -> str:
    """SHA-256 of a set of LoRA factors by module name, dtype, shape and bytes: what masks are
    computed from, so a masks file can be matched to its reference adapter."""
    sha = hashlib.sha256()
    for module in sorted(modules, key=lambda m: natural_key(m.name)):
        for key, label in ((module.key_a, "A"), (module.key_b, "B")):
            tensor = tensors[key].detach().cpu().contiguous()
            sha.update(f"{module.name}.{label}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


# -- stage 1: amplify -----------------------------------------------------------------------------


def amplify(aligned_adapter: str, out: str | Path, *, factor: float = DEFAULT_AMPLIFY, force: bool = False) -> Report:
    """Write the reference adapter: the aligned adapter with dW scaled by `factor`."""
    started = time.perf_counter()
    _validate_amplify(factor)
    aligned = Adapter.load(aligned_adapter, "aligned adapter")
    _check_patchable(aligned, "aligned adapter")
    out = Path(out)
    check_target(out, force, [aligned.directory])
    replaced = amplified_tensors(aligned, factor)
    metadata = dict(aligned.metadata or {"format": "pt"})
    metadata.update({"realign_nlsr_amplify": repr(factor), "realign_version": __version__})
    report = Report(
        command="nlsr amplify",
        inputs={"aligned_adapter": str(aligned_adapter)},
        settings={"amplify": factor, "per_factor": math.sqrt(factor)},
        summary={"modules": len(aligned.modules), "amplify": factor},
        output=str(out),
    )
    with atomic_directory(out, force, [aligned.directory]) as staging:
        write_adapter(_with_metadata(aligned, metadata), staging, replaced)
        report.timings = {"total_s": round(time.perf_counter() - started, 4)}
        (staging / REPORT_FILE).write_text(report.to_json())
    return report


def _with_metadata(adapter: Adapter, metadata: dict[str, str]) -> Adapter:
    return Adapter(adapter.directory, adapter.config, adapter.tensors, metadata, adapter.modules, adapter.passthrough)


# -- stage 2: regions ---------------------------------------------------------------------------------


@dataclass
class Regions:
    masks: dict[str, torch.Tensor]  # reference tensor key -> bool mask
    modules: list[dict]  # per module: q, eigen-gaps, mask densities
    calibration: dict  # examples, response tokens, truncated prompts, passes


def _reference_model(base: str, adapter_dir: Path, reference: Adapter, tensors: dict[str, torch.Tensor], dev: torch.device):
    """base + the reference adapter as a PEFT model (LoRA unmerged, as the reference runs it),
    its factors set to `tensors`; and the model's LoRA layer for each adapter module."""
    from ..io.models import apply_adapter, load_causal_lm

    model, tokenizer, _ = load_causal_lm(base, dev, role="base")
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
    return peft_model, tokenizer, located


def compute_regions(
    base: str,
    adapter_dir: Path,
    reference: Adapter,
    tensors: dict[str, torch.Tensor],
    calibration_spec: str,
    settings: RegionSettings,
    dev: torch.device,
    progress: Progress | None = None,
) -> Regions:
    """Safety-region masks of every factor of the reference adapter (`tensors`, applied to base)."""
    return compute_regions_at(base, adapter_dir, reference, tensors, calibration_spec, settings, [settings.sparsity], dev,
                              progress)[0]


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
) -> list[Regions]:
    """`compute_regions` at each of `sparsities` (settings.sparsity ignored). In one-pass mode the
    features do not depend on the sparsity, so one calibration pass serves them all; sequential
    mode projects each layer before the next one runs, so it takes one sparsity only."""
    if settings.mode == method.SEQUENTIAL and len(sparsities) != 1:
        raise ValueError("sequential regions depend on the sparsity: compute one at a time")
    examples = load_examples(calibration_spec, "safety data")
    if settings.max_samples is not None:
        examples = examples[: settings.max_samples]
    model, tokenizer, located = _reference_model(base, adapter_dir, reference, tensors, dev)
    calibration = encode_calibration(tokenizer, examples, settings.max_response_tokens, context_length(model))
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
    n_batches = math.ceil(len(calibration.encoded) / settings.batch_size)
    total, done = n_batches * len(order), 0

    masks: list[dict[str, torch.Tensor]] = [{} for _ in sparsities]
    rows: list[list[dict]] = [[] for _ in sparsities]
    for prefix in order:
        members = groups[prefix]
        taps = {m.name: Tap(located[m.name][1].lora_A["default"], "output") for m in members}
        stop = inner.get_submodule(prefix) if prefix else None

        def tick(_rows: int) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

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
    stats = {
        "examples": len(calibration.encoded),
        "response_tokens": calibration.response_tokens,
        "truncated_prompts": calibration.truncated_prompts,
        "passes": len(order),
    }
    return [Regions(found, sorted(found_rows, key=lambda r: natural_key(r["name"])), dict(stats))
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


def _data_path(spec: str) -> Path:
    return Path(re.sub(r"@\d+$", "", spec)).expanduser()


def _calibration_id(spec: str, max_samples: int | None) -> str:
    """SHA-256 of the calibration file, with the limits that picked examples from it."""
    limit = re.search(r"@\d+$", spec)
    return json.dumps({"sha256": hashlib.sha256(_data_path(spec).read_bytes()).hexdigest(),
                       "limit": limit[0] if limit else None, "max_samples": max_samples})


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
) -> Report:
    """Write the safety-region masks of the reference adapter to `out` (a safetensors file)."""
    return regions_at(base, reference, safety_data, {sparsity: out}, mode=mode, max_response_tokens=max_response_tokens,
                      max_samples=max_samples, batch_size=batch_size, device=device, force=force, progress=progress)[sparsity]


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
    ref = Adapter.load(reference, "reference adapter")
    _check_patchable(ref, "reference adapter")
    base_dir = resolve_local(base, "base")
    inputs = [base_dir, ref.directory, _data_path(safety_data)]
    for out in outs.values():
        check_target(Path(out), force, inputs)
    any_settings = next(iter(all_settings.values()))
    found_all = compute_regions_at(base, ref.directory, ref, ref.tensors, safety_data, any_settings, list(outs), dev, progress)
    reference_digest = factors_digest(ref.tensors, ref.modules)
    calibration_id = _calibration_id(safety_data, max_samples)
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


def _regions_notes(found: Regions) -> list[str]:
    gaps = [g for row in found.modules for g in row["gap"]]
    notes = []
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
        notes=_regions_notes(found),
    )


# -- stage 3: patch --------------------------------------------------------------------------------


def read_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return read_tagged_safetensors(path, "masks file", MASKS_FORMAT, "realign_masks_version", MASKS_VERSION,
                                   "realign nlsr regions")


def _check_masks(masks: dict[str, torch.Tensor], metadata: dict[str, str], reference: Adapter, reference_tensors,
                 expected: dict[str, object]) -> dict:
    if metadata.get("reference_digest") != factors_digest(reference_tensors, reference.modules):
        raise RealignError("the masks were computed from a different reference adapter (its factors do not match)")
    settings = json.loads(metadata.get("settings", "{}"))
    for name, value in expected.items():
        if value is not None and settings.get(name) != value:
            raise RealignError(f"the masks were computed with {name} {settings.get(name)!r}, not {value!r}")
    for module in reference.modules:
        for key in (module.key_a, module.key_b):
            mask = masks.get(key)
            if mask is None:
                raise RealignError(f"the masks file has no mask for '{key}'")
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(reference_tensors[key].shape):
                raise RealignError(f"the mask for '{key}' is not a boolean {tuple(reference_tensors[key].shape)} tensor")
    return settings


def region_similarities(fine_tuned: Adapter, reference_tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                        pairs: dict[str, LoraModule]) -> dict[str, float | None]:
    """Each fine-tuned module's masked-factor similarity to its reference module (None: undefined)."""
    return {
        module.name: method.masked_similarity(
            (fine_tuned.tensors[module.key_a], fine_tuned.tensors[module.key_b]),
            (reference_tensors[pairs[module.name].key_a], reference_tensors[pairs[module.name].key_b]),
            (masks[pairs[module.name].key_a], masks[pairs[module.name].key_b]),
        )
        for module in fine_tuned.modules
    }


def patch_tensors(
    fine_tuned: Adapter,
    reference: Adapter,
    reference_tensors: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    pairs: dict[str, LoraModule],
    selection: method.Selection,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Per-module similarity and selection, and the replaced factors of the patched modules."""
    similarities = region_similarities(fine_tuned, reference_tensors, masks, pairs)
    scored = [m for m in fine_tuned.modules if similarities[m.name] is not None]
    if not scored:
        raise RealignError("no module has a defined similarity: the masked factors are zero in every module")
    chosen, probabilities = method.select([similarities[m.name] for m in scored], selection)
    verdict = {m.name: (chosen[i], probabilities[i] if probabilities else None) for i, m in enumerate(scored)}
    rows, replaced = [], {}
    for module in fine_tuned.modules:
        own = pairs[module.name]
        patched, probability = verdict.get(module.name, (False, None))
        mask_a, mask_b = masks[own.key_a], masks[own.key_b]
        if patched:
            for key, ref_key, mask in ((module.key_a, own.key_a, mask_a), (module.key_b, own.key_b, mask_b)):
                replaced[key] = method.transplant(fine_tuned.tensors[key], reference_tensors[ref_key], mask)
        rows.append({
            "name": module.name,
            "shape": [module.d_out, module.d_in],
            "rank": module.rank,
            "similarity": similarities[module.name],
            "probability": probability,
            "patched": patched,
            "mask_density": [float(mask_a.float().mean()), float(mask_b.float().mean())],
            "skipped": None if similarities[module.name] is not None else "masked product is zero: similarity undefined",
        })
    return rows, replaced


def _patch_summary(rows: list[dict], selection: method.Selection) -> dict:
    scored = [r["similarity"] for r in rows if r["similarity"] is not None]
    densities = [d for r in rows for d in r["mask_density"]]
    patched = sum(r["patched"] for r in rows)
    return {
        "modules": len(rows),
        "patched": patched,
        "patched_fraction": patched / len(rows),
        "skipped": sum(r["similarity"] is None for r in rows),
        "selection": selection.rule,
        "min_similarity": min(scored),
        "mean_similarity": sum(scored) / len(scored),
        "max_similarity": max(scored),
        "mask_density": sum(densities) / len(densities),
    }


def _write_patched(fine_tuned: Adapter, replaced, out: Path, force: bool, inputs, report: Report, started: float) -> None:
    report.output = str(out)
    with atomic_directory(out, force, inputs) as staging:
        write_adapter(fine_tuned, staging, replaced)
        report.timings = {"total_s": round(time.perf_counter() - started, 4)}
        (staging / REPORT_FILE).write_text(report.to_json())


def patch(
    reference: str,
    masks: str | Path,
    adapter: str,
    out: str | Path | None = None,
    *,
    selection: str = method.ADAPTIVE,
    prune_rate: float = 0.5,
    epsilon: float = 0.2,
    tau: float = 0.1,
    direction: str = method.PAPER,
    seed: int = 42,
    sparsity: float | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> Report:
    """Transplant the masked reference entries into the selected modules of `adapter`.
    `sparsity`, when given, must be the one the masks were computed with."""
    started = time.perf_counter()
    rule = method.Selection(selection, prune_rate, epsilon, tau, direction, seed)
    _validate_selection(rule)
    if not dry_run and out is None:
        raise RealignError("an output directory is needed (--out), or use --dry-run")
    ref, fine_tuned, pairs = _load_pair(reference, "reference adapter", adapter)
    mask_tensors, metadata = read_masks(masks)
    mask_settings = _check_masks(mask_tensors, metadata, ref, ref.tensors, {"sparsity": sparsity})
    inputs = [ref.directory, fine_tuned.directory, Path(masks)]
    if not dry_run:
        check_target(Path(out), force, inputs)
    rows, replaced = patch_tensors(fine_tuned, ref, ref.tensors, mask_tensors, pairs, rule)
    report = Report(
        command="nlsr patch",
        inputs={"reference": str(reference), "masks": str(masks), "adapter": str(adapter)},
        settings={**asdict(rule), "masks": mask_settings},
        modules=rows,
        passthrough=[{"key": k, "reason": v} for k, v in fine_tuned.passthrough.items()],
        summary=_patch_summary(rows, rule),
    )
    if not dry_run:
        _write_patched(fine_tuned, replaced, Path(out), force, inputs, report, started)
    report.timings = {"total_s": round(time.perf_counter() - started, 4)}
    return report


# -- one shot ------------------------------------------------------------------------------------


def nlsr(
    base: str,
    aligned_adapter: str,
    adapter: str,
    safety_data: str,
    out: str | Path | None = None,
    *,
    amplify_factor: float = DEFAULT_AMPLIFY,
    sparsity: float = 0.8,
    regions_mode: str = method.ONE_PASS,
    max_response_tokens: int = 256,
    max_samples: int | None = None,
    batch_size: int = 8,
    selection: str = method.ADAPTIVE,
    prune_rate: float = 0.5,
    epsilon: float = 0.2,
    tau: float = 0.1,
    direction: str = method.PAPER,
    seed: int = 42,
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """amplify -> regions -> patch in memory; the same result as the three stages with files."""
    started = time.perf_counter()
    _validate_amplify(amplify_factor)
    settings = RegionSettings(sparsity, regions_mode, max_response_tokens, max_samples, batch_size)
    settings.validate()
    rule = method.Selection(selection, prune_rate, epsilon, tau, direction, seed)
    _validate_selection(rule)
    if not dry_run and out is None:
        raise RealignError("an output directory is needed (--out), or use --dry-run")
    dev = resolve_device(device)
    aligned, fine_tuned, pairs = _load_pair(aligned_adapter, "aligned adapter", adapter)
    base_dir = resolve_local(base, "base")
    inputs = [base_dir, aligned.directory, fine_tuned.directory, _data_path(safety_data)]
    if not dry_run:
        check_target(Path(out), force, inputs)
    reference_tensors = amplified_tensors(aligned, amplify_factor)
    found = compute_regions(base, aligned.directory, aligned, reference_tensors, safety_data, settings, dev, progress)
    computed = time.perf_counter()
    rows, replaced = patch_tensors(fine_tuned, aligned, reference_tensors, found.masks, pairs, rule)
    regions_by_name = {r["name"]: r for r in found.modules}
    for row in rows:
        region = regions_by_name[pairs[row["name"]].name]
        row["q"], row["gap"] = region["q"], region["gap"]
    report = Report(
        command="nlsr",
        inputs={"base": str(base), "aligned_adapter": str(aligned_adapter), "adapter": str(adapter), "safety_data": str(safety_data)},
        settings={"amplify": amplify_factor, **asdict(settings), **asdict(rule), "device": str(dev)},
        modules=rows,
        passthrough=[{"key": k, "reason": v} for k, v in fine_tuned.passthrough.items()],
        summary={**_patch_summary(rows, rule), "calibration": found.calibration},
        notes=_regions_notes(found),
    )
    if not dry_run:
        _write_patched(fine_tuned, replaced, Path(out), force, inputs, report, started)
    report.timings = {"regions_s": round(computed - started, 4), "total_s": round(time.perf_counter() - started, 4)}
    return report
