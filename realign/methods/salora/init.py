"""SaLoRA's task-specific initialisation: (A0, B0) from the task data's subspace and W's top
singular directions, and W_res so that the model at init equals the aligned model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...calibration.examples import data_path
from ...calibration.grams import accumulate_grams, calibration_stats, checked, load_calibration, logits_kwargs
from ...errors import RealignError
from ...io.adapter_writer import lora_config, write_lora
from ...io.device import resolve_device
from ...io.identity import weights_digest
from ...io.models import load_causal_lm, release
from ...io.placement import placement, placement_note
from ...io.names import in_forward_order, layer_prefix, natural_key
from ...io.output import check_target
from ...io.targets import Target, find_targets
from ...progress import Progress, ticker
from ...report import Report
from ..patch import total_time, write_output
from . import math as method
from .layer import INIT_FILE, MODULE_FILE, RESIDUAL_FILE, read_init
from .module import collect_subspaces, few_tokens_notes, read_module, subspaces, taps_for


TASK_PASSES = ("one-pass", "sequential")


def sequential_task_pass(model, tokenizer, targets: list[Target], data_spec: str, bases: dict[str, torch.Tensor], rank: int,
                         rank_task: int, scaling: float, *, max_samples: int | None, max_response_tokens: int, batch_size: int,
                         progress: Progress | None = None):
    """The reference's task pass, block by block in forward order: a block's Sigma_t is measured
    with the blocks before it already at W_res (the LoRA not attached) and its own W_res is
    written into `model` before the next block runs. Returns {path: (A0, B0)}, {path: W_res},
    {path: V_t} and calibration stats; `model` is left with every target at W_res."""
    held_off = next((t.path for t in targets if t.module.weight.device.type == "meta"), None)
    if held_off is not None:  # accelerate re-reads such a weight from its offload map on every pass
        raise RealignError(f"--task-pass sequential writes W_res into the model block by block, which cannot be done to "
                           f"'{held_off}' offloaded to cpu or disk: use --task-pass one-pass, or a --max-memory that holds "
                           "the targeted layers on the GPUs")
    calibration = load_calibration(model, tokenizer, data_spec, max_samples, max_response_tokens)
    taps, sides = taps_for(targets)
    groups: dict[str, list[Target]] = {}
    for target in targets:
        groups.setdefault(layer_prefix(target.path), []).append(target)
    order = in_forward_order(groups)
    tick = ticker(-(-len(calibration.encoded) // batch_size) * len(order), progress)
    factors, residual, task_bases = {}, {}, {}
    for prefix in order:
        members = groups[prefix]
        grams = checked(accumulate_grams(model, calibration, {t.path: taps[t.path] for t in members}, batch_size,
                                          stop_after=model.get_submodule(prefix), on_batch=tick,
                                          forward_kwargs=logits_kwargs(model, [t.module for t in members])))
        found = subspaces(members, grams, sides, rank_task)
        for target in members:
            weight = target.weight()
            a0, b0 = method.task_factors(weight, found[target.path][0].to(weight.device), rank)
            w_res = method.residual_weight(weight, bases[target.path].to(weight.device), a0, b0, scaling)
            factors[target.path], residual[target.path], task_bases[target.path] = (a0, b0), w_res, found[target.path][0]
        with torch.no_grad():  # after the whole block: its modules all read the block's own input
            for target in members:
                w_res = residual[target.path]
                target.module.weight.copy_((w_res.T if target.transposed else w_res).to(target.module.weight.dtype))
    return factors, residual, task_bases, calibration_stats(calibration, len(order))


def subspace_overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    """||U^T V||_F^2 / r for orthonormal U, V of r columns: 1 for the same subspace, 0 for orthogonal ones."""
    return float(u.double().T.matmul(v.double()).square().sum() / u.shape[1])


def _overlap_summary(rows: list[dict]) -> dict:
    overlaps = [row["task_overlap_with_one_pass"] for row in rows if "task_overlap_with_one_pass" in row]
    return {"task_overlap_with_one_pass": {"mean": sum(overlaps) / len(overlaps), "min": min(overlaps)}} if overlaps else {}


def _earlier_task_factors(init_dir: str | Path, aligned_digest: str, rank: int, rank_task: int):
    """({path: (A0, B0)}, calibration stats) of an earlier init whose task factors fit."""

    settings, factors, _, _ = read_init(init_dir)
    if settings.get("task_pass", "one-pass") != "one-pass":
        raise RealignError(f"the init in '{init_dir}' made a sequential task pass, whose task factors depend on its safety "
                           "module (each block saw the blocks before at W_res): give --task-data instead")
    if settings.get("aligned_digest") != aligned_digest:
        raise RealignError(f"the init in '{init_dir}' was made for another model than the safety module")
    if settings.get("rank") != rank or settings.get("rank_task") != rank_task:
        raise RealignError(f"the init in '{init_dir}' has rank {settings.get('rank')} and rank_task {settings.get('rank_task')}; "
                           f"this one asks for {rank} and {rank_task}")
    return factors, settings.get("calibration", {})


# Long but linear: check the settings, load, the task pass (one-pass, sequential or reused), W_res
# per module, write; the algebra is in math.py and module.py.
def init(
    aligned: str,
    module_file: str | Path,
    task_data: str | None,
    out: str | Path,
    *,
    task_from: str | Path | None = None,
    rank: int = 16,
    alpha: float = 16.0,
    rank_task: int = 32,
    max_samples: int | None = None,
    max_response_tokens: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    task_pass: str = "one-pass",
    device_map: str | None = None,
    max_memory: str | None = None,
) -> Report:
    """Task-specific initialisation: write INIT_DIR with (A0, B0) as a PEFT adapter, W_res, and
    the safety module; the model with W_res + s C B0 A0 equals the aligned model.

    `task_pass`: "one-pass" measures every Sigma_t on the unmodified aligned model (which equals
    the model at init); "sequential" reproduces the reference (`sequential_task_pass`) and
    reports each module's overlap between its V_t and the one-pass V_t.

    (A0, B0) do not depend on the safety module: with `task_from` (an earlier init of the same
    aligned model, rank and rank_task) they are taken from there instead of a new task pass,
    and only W_res is computed for this module; that is how an r_s sweep stays cheap.

    `device_map` and `max_memory` spread the model over devices (docs/dispatch.md); each
    module's W_res is computed on the device its layer computes on."""

    started = time.perf_counter()
    if rank < 1 or rank_task < 1:
        raise RealignError("--rank and --rank-task must be at least 1")
    if not alpha > 0:
        raise RealignError("--alpha must be positive")
    if (task_data is None) == (task_from is None):
        raise RealignError("give exactly one of --task-data (the task examples) and --task-from (an earlier init whose task factors to reuse)")
    if task_pass not in TASK_PASSES:
        raise RealignError(f"--task-pass must be one of {', '.join(TASK_PASSES)}, got '{task_pass}'")
    if task_pass == "sequential" and task_from is not None:
        raise RealignError("--task-pass sequential computes task factors that depend on this module: give --task-data, not --task-from")
    bases, metadata = read_module(module_file)
    earlier = _earlier_task_factors(task_from, metadata["aligned_digest"], rank, rank_task) if task_from is not None else None
    dev = resolve_device(device)
    placed = placement(device_map, max_memory, device)
    out = Path(out)
    model, tokenizer, directory = load_causal_lm(aligned, dev, role="aligned", placement=placed)
    try:
        inputs = [directory, Path(module_file), data_path(task_data) if task_data is not None else Path(task_from)]
        checked = check_target(out, force, inputs)
        targets = find_targets(model, tuple(bases))
        if [t.path for t in targets] != sorted(bases, key=natural_key) or weights_digest(targets) != metadata["aligned_digest"]:
            raise RealignError("the safety module was computed from another model (its target weights differ from ALIGNED's)")
        for target in targets:
            if rank > min(target.shape):
                raise RealignError(f"--rank {rank} exceeds the dimension min{target.shape} of '{target.path}'")
        scaling = alpha / rank
        sequential = None
        if earlier is None:
            task_bases, _, stats = collect_subspaces(model, tokenizer, targets, task_data, rank_task, max_samples=max_samples,
                                                     max_response_tokens=max_response_tokens, batch_size=batch_size, progress=progress)
            if task_pass == "sequential":  # last: it leaves the model's targets at W_res
                sequential = sequential_task_pass(model, tokenizer, targets, task_data, bases, rank, rank_task, scaling,
                                                  max_samples=max_samples, max_response_tokens=max_response_tokens,
                                                  batch_size=batch_size, progress=progress)
                stats = {**sequential[3], "passes": 1 + sequential[3]["passes"]}
        else:
            earlier_factors, stats = earlier
            if sorted(earlier_factors, key=natural_key) != [t.path for t in targets]:
                raise RealignError(f"the init in '{task_from}' covers other modules than the safety module")
        factors, residual, rows = {}, {}, []
        for target in targets:
            row = {"name": target.path, "shape": list(target.shape)}
            if sequential is not None:
                (a0, b0), w_res = sequential[0][target.path], sequential[1][target.path]
                row["task_overlap_with_one_pass"] = round(subspace_overlap(sequential[2][target.path], task_bases[target.path][0]), 6)
            else:
                weight = target.weight()  # on the device its layer computes on
                if earlier is None:
                    a0, b0 = method.task_factors(weight, task_bases[target.path][0].to(weight.device), rank)
                else:
                    a0, b0 = (f.to(weight.device) for f in earlier_factors[target.path])
                w_res = method.residual_weight(weight, bases[target.path].to(weight.device), a0, b0, scaling)
            factors[target.path] = (a0, b0)
            residual[target.path + ".weight"] = w_res.float().cpu().contiguous()
            row["b0_in_safety_subspace"] = float(bases[target.path].double().to(b0.device).T.matmul(b0.double()).square().sum()
                                                 / b0.double().square().sum().clamp_min(1e-300))
            rows.append(row)
        conv1d = any(t.transposed for t in targets)
        layout = placement_note(model)
        settings = {"modules": [t.path for t in targets], "rank": rank, "alpha": alpha, "scaling": scaling, "rank_task": rank_task,
                    "rank_safety": metadata["settings"].get("rank_safety"), "aligned_digest": metadata["aligned_digest"],
                    "conv1d": conv1d, "task_pass": task_pass, "calibration": stats,
                    "task_from": None if task_from is None else str(Path(task_from).expanduser().resolve())}
        report = Report(command="salora init", inputs={"aligned": str(aligned), "module": str(module_file),
                                                       **({"task_data": str(task_data)} if task_from is None else {"task_from": str(task_from)})},
                        settings={k: v for k, v in settings.items() if k != "modules"}, modules=rows,
                        summary={"modules": len(rows), **stats, **_overlap_summary(rows)}, output=str(out),
                        notes=([layout] if layout else []) + (few_tokens_notes(stats, rank_task, "--rank-task", "task subspace")
                                                                         if task_from is None else []))

        def fill(staging: Path) -> None:
            write_lora(staging, lora_config(settings["modules"], rank, alpha, base_model=str(aligned), fan_in_fan_out=conv1d), factors)
            save_file(residual, staging / RESIDUAL_FILE, metadata={"format": "pt"})
            (staging / MODULE_FILE).write_bytes(Path(module_file).expanduser().read_bytes())
            (staging / INIT_FILE).write_text(json.dumps(settings, indent=2))

        write_output(out, force, inputs, report, fill, total_time(started), checked=checked)
        return report
    finally:
        release(model)
