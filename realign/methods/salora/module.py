"""SaLoRA's fixed safety module: V_s of every target module from one calibration pass over safety
data, and the module file that stores it (V_s per module, never C = I - V_s V_s^T, with the
settings and a SHA-256 of the aligned target weights it was computed from)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ... import __version__
from ...calibration.examples import data_path
from ...calibration.grams import Tap, accumulate_grams, calibration_stats, checked, load_calibration, logits_kwargs
from ...errors import RealignError
from ...io.device import resolve_device
from ...io.identity import weights_digest
from ...io.models import load_causal_lm, release
from ...io.placement import placement, placement_note
from ...io.output import check_target, save_safetensors_atomic
from ...io.tagged import check_stage_tensors, metadata_json, read_tagged_safetensors
from ...io.targets import Target, find_targets
from ...progress import Progress, ticker
from ...report import Report
from . import math as method


MODULE_FORMAT = "realign-salora-module"


MODULE_VERSION = "1"


BASIS_SUFFIX = ".safety_basis"


DEFAULT_TARGETS = ("q_proj", "v_proj")


# Upper bound on the float64 matrices stacked for one batched decomposition; the decomposition
# needs about six times that in workspace.
_BATCH_BYTES = 1 << 27


def taps_for(targets: list[Target]) -> tuple[dict[str, Tap], dict[str, str]]:
    """One Gram per module, of whichever side is smaller: the input Sigma (d_in x d_in, shared by
    modules reading the same tensor) or the output Gram of X W^T directly (d_out x d_out, bias
    removed) when d_out < d_in. Returns the taps and each module's side."""
    taps, sides = {}, {}
    for target in targets:
        d_out, d_in = target.shape
        if d_out < d_in:
            bias = target.bias()
            taps[target.path] = Tap(target.module, "output", None if bias is None else (lambda y, b=bias: y - b.to(y.device)))
            sides[target.path] = "output"
        else:
            taps[target.path] = Tap(target.module, "input")
            sides[target.path] = "input"
    return taps, sides


def subspaces(targets: list[Target], grams: dict[str, torch.Tensor], sides: dict[str, str], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(V, eigenvalues) per module: top-`rank` eigenvectors of W Sigma W^T, one batched
    decomposition per group of same-shaped problems, chunked to bound memory."""
    groups: dict[tuple, list[Target]] = {}
    for target in targets:
        groups.setdefault((target.shape, sides[target.path]), []).append(target)
    result = {}
    for ((d_out, d_in), side), members in groups.items():
        if rank > min(d_out, d_in):
            raise RealignError(f"rank {rank} exceeds the dimension min({d_out}, {d_in}) of the {d_out}x{d_in} modules")
        per_chunk = max(1, _BATCH_BYTES // (8 * (d_in * d_in + d_out * d_in + d_out * d_out)))
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            stacked = torch.stack([grams[t.path] for t in chunk])
            if side == "output":
                basis, values = method.output_basis_from_output_gram(stacked, rank)
            else:
                weights = torch.stack([t.weight().to(stacked.device) for t in chunk])  # layers may sit on several GPUs
                basis, values = method.output_basis_from_input_gram(weights, stacked, rank)
            for i, target in enumerate(chunk):
                result[target.path] = (basis[i], values[i])
    return result


def collect_subspaces(model, tokenizer, targets: list[Target], data_spec: str, rank: int, *, max_samples: int | None,
                      max_response_tokens: int, batch_size: int, progress: Progress | None = None):
    """One calibration pass over `data_spec`, then the subspaces. Returns them and calibration stats."""
    calibration = load_calibration(model, tokenizer, data_spec, max_samples, max_response_tokens)
    taps, sides = taps_for(targets)
    tick = ticker(-(-len(calibration.encoded) // batch_size), progress)
    grams = checked(accumulate_grams(model, calibration, taps, batch_size, on_batch=tick,
                                      forward_kwargs=logits_kwargs(model, [t.module for t in targets])))
    return subspaces(targets, grams, sides, rank), sides, calibration_stats(calibration, 1)


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    if not items:
        raise RealignError("--targets needs at least one module name (e.g. q_proj,v_proj) or all-linear")
    return items


def module(
    aligned: str,
    safety_data: str,
    out: str | Path,
    *,
    targets: str | tuple[str, ...] = DEFAULT_TARGETS,
    rank_safety: int = 32,
    max_samples: int | None = None,
    max_response_tokens: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> Report:
    """Compute the safety module of `aligned` on `safety_data` and write it to `out`.
    `device_map` (auto, balanced, sequential) and `max_memory` ('0:70GiB,cpu:200GiB') spread
    the model over devices with accelerate (docs/dispatch.md)."""
    started = time.perf_counter()
    names = parse_targets(targets)
    if rank_safety < 1:
        raise RealignError("--rank-safety must be at least 1")
    if batch_size < 1:
        raise RealignError("--batch-size must be at least 1")
    if max_samples is not None and max_samples < 1:
        raise RealignError("--max-samples must be at least 1")
    dev = resolve_device(device)
    placed = placement(device_map, max_memory, device)
    out = Path(out)
    model, tokenizer, directory = load_causal_lm(aligned, dev, role="aligned", placement=placed)
    try:
        inputs = [directory, data_path(safety_data)]
        check_target(out, force, inputs)
        found = find_targets(model, names)
        bases, sides, stats = collect_subspaces(model, tokenizer, found, safety_data, rank_safety, max_samples=max_samples,
                                                max_response_tokens=max_response_tokens, batch_size=batch_size, progress=progress)
        digest = weights_digest(found)
        layout = placement_note(model)
    finally:
        release(model)
    rows = []
    for target in found:
        basis, values = bases[target.path]
        total = float(values.clamp_min(0).sum())
        rows.append({
            "name": target.path,
            "shape": list(target.shape),
            "gram": sides[target.path],
            "energy_in_subspace": float(values[:rank_safety].clamp_min(0).sum()) / total if total > 0 else None,
        })
    settings = {"targets": list(names), "rank_safety": rank_safety, "max_samples": max_samples,
                "max_response_tokens": max_response_tokens}
    metadata = {
        "format": "pt",
        "realign": MODULE_FORMAT,
        "realign_module_version": MODULE_VERSION,
        "realign_version": __version__,
        "aligned_digest": digest,
        "settings": json.dumps(settings),
        "calibration": json.dumps(stats),
    }
    tensors = {t.path + BASIS_SUFFIX: bases[t.path][0].float().cpu().contiguous() for t in found}
    report = Report(command="salora module", inputs={"aligned": str(aligned), "safety_data": str(safety_data)},
                    settings={**settings, "device": str(dev)}, modules=rows, summary={"modules": len(rows), **stats},
                    output=str(out), notes=([layout] if layout else []) + few_tokens_notes(stats, rank_safety, "--rank-safety", "safety subspace"))
    save_safetensors_atomic(out, tensors, metadata, force, inputs)
    report.timings = {"total_s": round(time.perf_counter() - started, 4)}
    return report


def few_tokens_notes(stats: dict, rank: int, option: str, what: str) -> list[str]:
    """A warning when calibration saw fewer response tokens than the rank of the subspace it
    estimates: the subspace is then padded with arbitrary directions."""
    tokens = stats.get("response_tokens")
    if isinstance(tokens, int) and tokens < rank:
        return [f"calibration has {tokens} response tokens, fewer than {option} {rank}: the {what} is underdetermined "
                "(use more data or a smaller rank)"]
    return []


def read_module(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(module path -> V_s, metadata with settings parsed) of a module file."""
    tensors, metadata = read_tagged_safetensors(path, "safety module", MODULE_FORMAT, "realign_module_version", MODULE_VERSION,
                                                "realign salora module")
    bases = {k[: -len(BASIS_SUFFIX)]: v for k, v in tensors.items() if k.endswith(BASIS_SUFFIX)}
    if not bases:
        raise RealignError(f"safety module '{path}' holds no safety bases")
    check_stage_tensors(bases, "safety module", path)  # float, finite, d_out x r_s
    for name, basis in bases.items():
        if not 1 <= basis.shape[1] <= basis.shape[0]:
            raise RealignError(f"safety module '{path}': the basis of '{name}' has shape {tuple(basis.shape)}, expected d_out x r_s "
                               "with 1 <= r_s <= d_out")
    return bases, {**metadata, "settings": metadata_json(metadata, "settings", "safety module", path)}


def narrow_module(module_file: str | Path, rank_safety: int, out: str | Path, *, force: bool = False) -> None:
    """The module of a smaller r_s from one of a larger r_s, without a calibration pass: the
    bases are ordered by eigenvalue, so the top r_s of them are the leading r_s columns (equal
    to `module(..., rank_safety=r_s)` on the same data, tested)."""
    bases, metadata = read_module(module_file)
    stored = metadata["settings"].get("rank_safety")
    if not 1 <= rank_safety <= min(b.shape[1] for b in bases.values()):
        raise RealignError(f"--rank-safety {rank_safety} must be between 1 and the module's own rank {stored}")
    settings = {**metadata["settings"], "rank_safety": rank_safety, "narrowed_from": stored}
    tensors = {path + BASIS_SUFFIX: basis[:, :rank_safety].contiguous() for path, basis in bases.items()}
    save_safetensors_atomic(Path(out), tensors, {**metadata, "settings": json.dumps(settings)}, force, [Path(module_file)])
