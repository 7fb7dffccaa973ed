"""NLSR stage 3: transplant the masked reference entries into the fine-tuned adapter, in the
modules whose safety region drifted most."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from ...errors import RealignError
from ...io.adapter import Adapter, LoraModule
from ...io.adapter_writer import write_patched
from ...io.identity import factors_digest
from ...io.tagged import metadata_json, read_tagged_safetensors
from ...report import Report
from ..patch import Patch, run
from . import math as method
from .pairs import load_pair
from .regions import MASKS_FORMAT, MASKS_VERSION


def validate_selection(selection: method.Selection) -> None:
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


def read_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(masks, metadata with its settings parsed) of a masks file."""
    masks, metadata = read_tagged_safetensors(path, "masks file", MASKS_FORMAT, "realign_masks_version", MASKS_VERSION,
                                              "realign nlsr regions")
    return masks, {**metadata, "settings": metadata_json(metadata, "settings", "masks file", path)}


def check_masks(masks: dict[str, torch.Tensor], metadata: dict[str, str], reference: Adapter, reference_tensors,
                 expected: dict[str, object]) -> dict:
    if metadata.get("reference_digest") != factors_digest(reference_tensors, reference.modules):
        raise RealignError("the masks were computed from a different reference adapter (its factors do not match)")
    settings = metadata.get("settings") or {}
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


def patch_summary(rows: list[dict], selection: method.Selection) -> dict:
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


class TransplantPatch(Patch):
    """The fine-tuned adapter with the masked reference entries transplanted into the selected
    modules. `masks` may be None until `score` (the one-shot command finds them there)."""

    command = "nlsr patch"

    def __init__(self, fine_tuned: Adapter, reference_tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None,
                 pairs: dict[str, LoraModule], rule: method.Selection, inputs: list[Path], names: dict, settings: dict):
        self.fine_tuned, self.reference_tensors, self.masks, self.pairs, self.rule = fine_tuned, reference_tensors, masks, pairs, rule
        self._inputs, self.names, self.settings = inputs, names, settings
        self.notes: list[str] = []
        self.summary: dict = {}
        self.timings: dict[str, float] = {}

    def inputs(self) -> list[Path]:
        return self._inputs

    def score(self, progress) -> tuple[list[dict], dict[str, torch.Tensor]]:
        return patch_tensors(self.fine_tuned, self.reference_tensors, self.masks, self.pairs, self.rule)

    def select(self, result) -> set[str]:
        return {row["name"] for row in result[0] if row["patched"]}

    def report(self, result, selected: set[str]) -> Report:
        rows = result[0]
        return Report(
            command=self.command,
            inputs=self.names,
            settings=self.settings,
            modules=rows,
            passthrough=[{"key": k, "reason": v} for k, v in self.fine_tuned.passthrough.items()],
            summary={**patch_summary(rows, self.rule), **self.summary},
            timings=dict(self.timings),
            notes=self.notes,
        )

    def write(self, staging: Path, result, selected: set[str], report: Report) -> None:
        write_patched(self.fine_tuned, staging, result[1])


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
    rule = method.Selection(selection, prune_rate, epsilon, tau, direction, seed)
    validate_selection(rule)

    def plan() -> TransplantPatch:
        ref, fine_tuned, pairs = load_pair(reference, "reference adapter", adapter)
        mask_tensors, metadata = read_masks(masks)
        mask_settings = check_masks(mask_tensors, metadata, ref, ref.tensors, {"sparsity": sparsity})
        return TransplantPatch(fine_tuned, ref.tensors, mask_tensors, pairs, rule, [ref.directory, fine_tuned.directory, Path(masks)],
                               {"reference": str(reference), "masks": str(masks), "adapter": str(adapter)},
                               {**asdict(rule), "masks": mask_settings})

    return run(plan, out, dry_run=dry_run, force=force)
