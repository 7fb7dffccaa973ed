"""`realign salora`: the fixed safety module (one calibration pass), and its post-hoc use on an
existing adapter.

The module file stores V_s (d_out x r_s) per target module, never C = I - V_s V_s^T, with the
settings and a SHA-256 of the aligned target weights it was computed from.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from .. import __version__
from ..data import load_examples
from ..device import resolve_device
from ..errors import RealignError
from ..features import Tap, accumulate_grams, context_length, encode_calibration, logits_kwargs
from ..io.adapter import Adapter, write_adapter
from ..io.names import find_module, in_forward_order, layer_prefix, natural_key
from ..io.output import atomic_directory, check_target, read_tagged_safetensors, save_safetensors_atomic
from ..methods import salora as method
from ..report import Report
from ..targets import Target, find_targets
from .nlsr import _data_path

MODULE_FORMAT = "realign-salora-module"
MODULE_VERSION = "1"
BASIS_SUFFIX = ".safety_basis"
REPORT_FILE = "realign_report.json"
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Upper bound on the float64 matrices stacked for one batched decomposition; the decomposition
# needs about six times that in workspace.
_BATCH_BYTES = 1 << 27

Progress = Callable[[int, int], None]


def _taps(targets: list[Target]) -> tuple[dict[str, Tap], dict[str, str]]:
    """One Gram per module, of whichever side is smaller: the input Sigma (d_in x d_in, shared by
    modules reading the same tensor) or the output Gram of X W^T directly (d_out x d_out, bias
    removed) when d_out < d_in. Returns the taps and each module's side."""
    taps, sides = {}, {}
    for target in targets:
        d_out, d_in = target.shape
        if d_out < d_in:
            bias = target.bias()
            taps[target.path] = Tap(target.module, "output", None if bias is None else (lambda y, b=bias: y - b))
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
                basis, values = method.output_basis_from_input_gram(torch.stack([t.weight() for t in chunk]), stacked, rank)
            for i, target in enumerate(chunk):
                result[target.path] = (basis[i], values[i])
    return result


def weights_digest(targets: list[Target]) -> str:
    """SHA-256 of the target weights (name, shape, float32 bytes): which model a module file or
    an initialisation belongs to."""
    sha = hashlib.sha256()
    for target in targets:
        w = target.weight().cpu().contiguous()
        sha.update(f"{target.path}:{tuple(w.shape)};".encode())
        sha.update(w.numpy().tobytes())
    return sha.hexdigest()


def collect_subspaces(model, tokenizer, targets: list[Target], data_spec: str, rank: int, *, max_samples: int | None,
                      max_response_tokens: int, batch_size: int, progress: Progress | None = None):
    """One calibration pass over `data_spec`, then the subspaces. Returns them and calibration stats."""
    calibration = _calibration(model, tokenizer, data_spec, max_samples, max_response_tokens)
    taps, sides = _taps(targets)
    tick = _ticker(-(-len(calibration.encoded) // batch_size), progress)
    grams = _checked(accumulate_grams(model, calibration, taps, batch_size, on_batch=tick,
                                      forward_kwargs=logits_kwargs(model, [t.module for t in targets])))
    return subspaces(targets, grams, sides, rank), sides, _calibration_stats(calibration, 1)


def _calibration(model, tokenizer, data_spec: str, max_samples: int | None, max_response_tokens: int):
    examples = load_examples(data_spec, "data")
    if max_samples is not None:
        examples = examples[:max_samples]
    return encode_calibration(tokenizer, examples, max_response_tokens, context_length(model))


def _ticker(total: int, progress: Progress | None) -> Callable[[int], None]:
    """A per-batch callback that reports (batches done, `total`) to `progress`."""
    done = [0]

    def tick(_rows: int) -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return tick


def _checked(grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, gram in grams.items():
        if not torch.isfinite(gram).all():
            raise RealignError(f"module '{name}': the calibration features overflow (Inf/NaN); check the model and data")
    return grams


def _calibration_stats(calibration, passes: int) -> dict:
    return {"examples": len(calibration.encoded), "response_tokens": calibration.response_tokens,
            "truncated_prompts": calibration.truncated_prompts, "passes": passes}


def _parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
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
) -> Report:
    """Compute the safety module of `aligned` on `safety_data` and write it to `out`."""
    from ..io.models import load_causal_lm

    started = time.perf_counter()
    names = _parse_targets(targets)
    if rank_safety < 1:
        raise RealignError("--rank-safety must be at least 1")
    if batch_size < 1:
        raise RealignError("--batch-size must be at least 1")
    if max_samples is not None and max_samples < 1:
        raise RealignError("--max-samples must be at least 1")
    dev = resolve_device(device)
    out = Path(out)
    model, tokenizer, directory = load_causal_lm(aligned, dev, role="aligned")
    inputs = [directory, _data_path(safety_data)]
    check_target(out, force, inputs)
    found = find_targets(model, names)
    bases, sides, stats = collect_subspaces(model, tokenizer, found, safety_data, rank_safety, max_samples=max_samples,
                                            max_response_tokens=max_response_tokens, batch_size=batch_size, progress=progress)
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
        "aligned_digest": weights_digest(found),
        "settings": json.dumps(settings),
        "calibration": json.dumps(stats),
    }
    tensors = {t.path + BASIS_SUFFIX: bases[t.path][0].float().cpu().contiguous() for t in found}
    report = Report(command="salora module", inputs={"aligned": str(aligned), "safety_data": str(safety_data)},
                    settings={**settings, "device": str(dev)}, modules=rows, summary={"modules": len(rows), **stats},
                    output=str(out))
    save_safetensors_atomic(out, tensors, metadata, force, inputs)
    report.timings = {"total_s": round(time.perf_counter() - started, 4)}
    return report


def read_module(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(module path -> V_s, metadata with settings parsed) of a module file."""
    tensors, metadata = read_tagged_safetensors(path, "safety module", MODULE_FORMAT, "realign_module_version", MODULE_VERSION,
                                                "realign salora module")
    bases = {k[: -len(BASIS_SUFFIX)]: v for k, v in tensors.items() if k.endswith(BASIS_SUFFIX)}
    if not bases:
        raise RealignError(f"safety module '{path}' holds no safety bases")
    return bases, {**metadata, "settings": json.loads(metadata.get("settings", "{}"))}


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


def apply(module_file: str | Path, adapter: str, out: str | Path | None = None, *, dry_run: bool = False, force: bool = False) -> Report:
    """B' = C B for every module of `adapter` that the safety module covers. Post-hoc and cheap;
    NOT the paper's method (SaLoRA trains with C in place)."""
    started = time.perf_counter()
    if not dry_run and out is None:
        raise RealignError("an output directory is needed (--out), or use --dry-run")
    bases, metadata = read_module(module_file)
    lora = Adapter.load(adapter, "adapter")
    inputs = [lora.directory, Path(module_file)]
    if not dry_run:
        check_target(Path(out), force, inputs)
    replaced, rows = {}, []
    for m in lora.modules:
        found = find_module(m.name, bases, "safety module")
        if found is None:
            rows.append({"name": m.name, "projected": False, "removed_fraction": None, "skipped": "not covered by the safety module"})
            continue
        basis = bases[found]
        if basis.shape[0] != m.d_out:
            raise RealignError(f"module '{m.name}': the safety module is for {basis.shape[0]} outputs, the adapter has {m.d_out}; "
                               "was it computed on another model?")
        b = lora.tensors[m.key_b]
        projected = method.project_out(basis.double(), b.double())
        before = float(b.double().square().sum())
        removed = 1.0 - float(projected.square().sum()) / before if before > 0 else 0.0
        replaced[m.key_b] = projected.float()
        rows.append({"name": m.name, "projected": True, "removed_fraction": removed, "skipped": None})
    if not replaced:
        raise RealignError("the safety module covers none of the adapter's modules")
    report = Report(command="salora apply", inputs={"module": str(module_file), "adapter": str(adapter)},
                    settings={"rank_safety": metadata["settings"].get("rank_safety")}, modules=rows,
                    summary={"modules": len(rows), "projected": len(replaced)},
                    notes=["post-hoc projection B' = (I - V_s V_s^T) B of an existing adapter: cheap, but not SaLoRA "
                           "itself, which trains with the safety module in place"])
    if not dry_run:
        report.output = str(out)
        with atomic_directory(Path(out), force, inputs) as staging:
            write_adapter(lora, staging, replaced)
            report.timings = {"total_s": round(time.perf_counter() - started, 4)}
            (staging / REPORT_FILE).write_text(report.to_json())
    report.timings = {"total_s": round(time.perf_counter() - started, 4)}
    return report


# -- init ------------------------------------------------------------------------------------------------


def _lora_config(paths: list[str], rank: int, alpha: float, base: str, conv1d: bool, patterns: bool = False) -> dict:
    """A PEFT LoRA config targeting exactly `paths` (peft matches a target by name suffix)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(paths), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=conv1d, base_model_name_or_path=base,
                        rank_pattern={p: rank for p in paths} if patterns else {},
                        alpha_pattern={p: alpha for p in paths} if patterns else {})
    return config.to_dict()


def _save_lora(directory: Path, config: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], conv1d: bool) -> None:
    """A PEFT adapter directory: config plus factors keyed as peft saves them."""
    from safetensors.torch import save_file

    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.float().cpu().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.float().cpu().contiguous()
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


TASK_PASSES = ("one-pass", "sequential")


def sequential_task_pass(model, tokenizer, targets: list[Target], data_spec: str, bases: dict[str, torch.Tensor], rank: int,
                         rank_task: int, scaling: float, *, max_samples: int | None, max_response_tokens: int, batch_size: int,
                         progress: Progress | None = None):
    """The reference's task pass, block by block in forward order: a block's Sigma_t is measured
    with the blocks before it already at W_res (the LoRA not attached) and its own W_res is
    written into `model` before the next block runs. Returns {path: (A0, B0)}, {path: W_res},
    {path: V_t} and calibration stats; `model` is left with every target at W_res."""
    calibration = _calibration(model, tokenizer, data_spec, max_samples, max_response_tokens)
    taps, sides = _taps(targets)
    groups: dict[str, list[Target]] = {}
    for target in targets:
        groups.setdefault(layer_prefix(target.path), []).append(target)
    order = in_forward_order(groups)
    tick = _ticker(-(-len(calibration.encoded) // batch_size) * len(order), progress)
    factors, residual, task_bases = {}, {}, {}
    for prefix in order:
        members = groups[prefix]
        grams = _checked(accumulate_grams(model, calibration, {t.path: taps[t.path] for t in members}, batch_size,
                                          stop_after=model.get_submodule(prefix), on_batch=tick,
                                          forward_kwargs=logits_kwargs(model, [t.module for t in members])))
        found = subspaces(members, grams, sides, rank_task)
        for target in members:
            weight = target.weight()
            a0, b0 = method.task_factors(weight, found[target.path][0], rank)
            w_res = method.residual_weight(weight, bases[target.path].to(weight.device), a0, b0, scaling)
            factors[target.path], residual[target.path], task_bases[target.path] = (a0, b0), w_res, found[target.path][0]
        with torch.no_grad():  # after the whole block: its modules all read the block's own input
            for target in members:
                w_res = residual[target.path]
                target.module.weight.copy_((w_res.T if target.transposed else w_res).to(target.module.weight.dtype))
    return factors, residual, task_bases, _calibration_stats(calibration, len(order))


def subspace_overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    """||U^T V||_F^2 / r for orthonormal U, V of r columns: 1 for the same subspace, 0 for orthogonal ones."""
    return float(u.double().T.matmul(v.double()).square().sum() / u.shape[1])


def _overlap_summary(rows: list[dict]) -> dict:
    overlaps = [row["task_overlap_with_one_pass"] for row in rows if "task_overlap_with_one_pass" in row]
    return {"task_overlap_with_one_pass": {"mean": sum(overlaps) / len(overlaps), "min": min(overlaps)}} if overlaps else {}


def _earlier_task_factors(init_dir: str | Path, aligned_digest: str, rank: int, rank_task: int):
    """({path: (A0, B0)}, calibration stats) of an earlier init whose task factors fit."""
    from ..salora_layer import read_init

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
) -> Report:
    """Task-specific initialisation: write INIT_DIR with (A0, B0) as a PEFT adapter, W_res, and
    the safety module; the model with W_res + s C B0 A0 equals the aligned model.

    `task_pass`: "one-pass" measures every Sigma_t on the unmodified aligned model (which equals
    the model at init); "sequential" reproduces the reference (`sequential_task_pass`) and
    reports each module's overlap between its V_t and the one-pass V_t.

    (A0, B0) do not depend on the safety module: with `task_from` (an earlier init of the same
    aligned model, rank and rank_task) they are taken from there instead of a new task pass,
    and only W_res is computed for this module; that is how an r_s sweep stays cheap."""
    from ..io.models import load_causal_lm
    from ..salora_layer import INIT_FILE, MODULE_FILE, RESIDUAL_FILE

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
    out = Path(out)
    model, tokenizer, directory = load_causal_lm(aligned, dev, role="aligned")
    inputs = [directory, Path(module_file), _data_path(task_data) if task_data is not None else Path(task_from)]
    check_target(out, force, inputs)
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
            if earlier is None:
                a0, b0 = method.task_factors(target.weight(), task_bases[target.path][0], rank)
            else:
                a0, b0 = (f.to(dev) for f in earlier_factors[target.path])
            w_res = method.residual_weight(target.weight(), bases[target.path].to(dev), a0, b0, scaling)
        factors[target.path] = (a0, b0)
        residual[target.path + ".weight"] = w_res.float().cpu().contiguous()
        row["b0_in_safety_subspace"] = float(bases[target.path].double().to(dev).T.matmul(b0.double()).square().sum()
                                             / b0.double().square().sum().clamp_min(1e-300))
        rows.append(row)
    conv1d = any(t.transposed for t in targets)
    settings = {"modules": [t.path for t in targets], "rank": rank, "alpha": alpha, "scaling": scaling, "rank_task": rank_task,
                "rank_safety": metadata["settings"].get("rank_safety"), "aligned_digest": metadata["aligned_digest"],
                "conv1d": conv1d, "task_pass": task_pass, "calibration": stats,
                "task_from": None if task_from is None else str(Path(task_from).expanduser().resolve())}
    report = Report(command="salora init", inputs={"aligned": str(aligned), "module": str(module_file),
                                                   **({"task_data": str(task_data)} if task_from is None else {"task_from": str(task_from)})},
                    settings={k: v for k, v in settings.items() if k != "modules"}, modules=rows,
                    summary={"modules": len(rows), **stats, **_overlap_summary(rows)}, output=str(out))
    with atomic_directory(out, force, inputs) as staging:
        _save_lora(staging, _lora_config(settings["modules"], rank, alpha, str(aligned), conv1d), factors, conv1d)
        from safetensors.torch import save_file

        save_file(residual, staging / RESIDUAL_FILE, metadata={"format": "pt"})
        (staging / MODULE_FILE).write_bytes(Path(module_file).expanduser().read_bytes())
        (staging / INIT_FILE).write_text(json.dumps(settings, indent=2))
        report.timings = {"total_s": round(time.perf_counter() - started, 4)}
        (staging / REPORT_FILE).write_text(report.to_json())
    return report


# -- export ----------------------------------------------------------------------------------------------


def export(init_dir: str | Path, run_dir: str | Path, out: str | Path, *, force: bool = False) -> Report:
    """A standard PEFT LoRA adapter on the ORIGINAL aligned weights: W + s C (B A - B0 A0) as a
    rank-2r LoRA, re-factored in float64 and saved in float32."""
    from ..salora_layer import FACTORS_FILE, read_init

    started = time.perf_counter()
    settings, init_factors, _, bases = read_init(init_dir)
    run = Path(run_dir).expanduser()
    if not (run / FACTORS_FILE).is_file():
        raise RealignError(f"'{run_dir}' is not a SaLoRA run directory (no {FACTORS_FILE}; run `realign salora train`)")
    trained = load_file(run / FACTORS_FILE)
    out = Path(out)
    inputs = [Path(init_dir), run]
    check_target(out, force, inputs)
    rank, scaling = settings["rank"], settings["scaling"]
    folded, rows = {}, []
    for path in settings["modules"]:
        a, b = trained.get(path + ".lora_A"), trained.get(path + ".lora_B")
        if a is None or b is None:
            raise RealignError(f"the run has no trained factors for '{path}'")
        a0, b0 = init_factors[path]
        if a.shape != a0.shape or b.shape != b0.shape:
            raise RealignError(f"'{path}': the run's factors {tuple(b.shape)}x{tuple(a.shape)} do not fit the init")
        a2, b2 = method.fold_for_export(a, b, a0, b0, bases[path])
        folded[path] = (a2, b2)
        rows.append({"name": path, "rank": 2 * rank, "delta_norm": float((b2 @ a2).norm() * scaling)})
    conv1d = bool(settings.get("conv1d"))
    config = _lora_config(settings["modules"], 2 * rank, 2 * rank * scaling, None, conv1d, patterns=True)
    report = Report(command="salora export", inputs={"init": str(init_dir), "run": str(run_dir)},
                    settings={"rank": 2 * rank, "lora_alpha": 2 * rank * scaling}, modules=rows,
                    summary={"modules": len(rows)}, output=str(out))
    with atomic_directory(out, force, inputs) as staging:
        _save_lora(staging, config, folded, conv1d)
        report.timings = {"total_s": round(time.perf_counter() - started, 4)}
        (staging / REPORT_FILE).write_text(report.to_json())
    return report


# -- train -----------------------------------------------------------------------------------------------

RUN_STATE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


def train(
    aligned: str,
    init_dir: str | Path,
    train_data: str,
    run_dir: str | Path,
    *,
    epochs: float = 1.0,
    lr: float = 1e-4,
    batch_size: int = 16,
    max_length: int = 512,
    seed: int = 0,
    save_every: int = 50,
    max_steps: int | None = None,
    device: str = "auto",
    restart: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    loss: str = "response",
    block_size: int = 128,
) -> Report:
    """Train A and B of every SaLoRA layer (C frozen) with a response-only loss (or, with
    loss="full", the reference's full-sequence loss on packed `block_size` blocks); checkpoints to
    RUN_DIR every `save_every` steps and at the end; an interrupted run resumes where it stopped
    (the same batches, the optimizer state restored) unless `restart`."""
    import math

    from ..io.models import load_causal_lm
    from ..salora_layer import FACTORS_FILE, attach, factors_of, read_init
    from ..train import BATCHING, LOSSES, sft, training_items

    started = time.perf_counter()
    if not epochs > 0 or not lr > 0 or batch_size < 1 or max_length < 2 or save_every < 0:
        raise RealignError("--epochs and --lr must be positive, --batch-size at least 1, --max-length at least 2")
    if loss not in LOSSES:
        raise RealignError(f"--loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    settings_init, _, _, _ = read_init(init_dir)
    examples = load_examples(train_data, "training data")
    if max_steps is not None and max_steps < 1:
        raise RealignError("--max-steps must be at least 1")
    dev = resolve_device(device)
    model, tokenizer, directory = load_causal_lm(aligned, dev, role="aligned")
    # an epoch is the examples, or with the full loss the packed blocks they make
    items = len(examples) if loss == "response" else len(training_items(tokenizer, examples, loss, max_length, block_size))
    steps = max_steps if max_steps is not None else max(1, math.ceil(epochs * items / batch_size))
    run = Path(run_dir).expanduser()
    plan = {"init": str(Path(init_dir).expanduser().resolve()), "train_data_sha256": hashlib.sha256(_data_path(train_data).read_bytes()).hexdigest(),
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed, "steps": steps,
            "batching": BATCHING, **({"loss": loss, "block_size": block_size} if loss != "response" else {})}
    state = json.loads((run / RUN_STATE).read_text()) if (run / RUN_STATE).is_file() and not restart else None
    if state is not None and state["plan"] != plan:
        raise RealignError(f"'{run_dir}' holds a run with other settings or data; use --restart to start over")
    if run.exists() and state is None and any(run.iterdir()) and not restart:
        raise RealignError(f"'{run_dir}' exists and is not a SaLoRA run; use --restart to replace it")
    check_target(run, True, [directory, Path(init_dir), _data_path(train_data)])
    factors = None
    if state is not None and (run / FACTORS_FILE).is_file():
        saved = load_file(run / FACTORS_FILE)
        factors = {p: (saved[p + ".lora_A"], saved[p + ".lora_B"]) for p in settings_init["modules"]}
    layers = attach(model, init_dir, factors)
    start = state["step"] if state else 0
    losses = state["losses"] if state else []
    optimizer_state = torch.load(run / OPTIMIZER_FILE, map_location=dev, weights_only=True) if start else None
    run.mkdir(parents=True, exist_ok=True)
    if state is None:
        for name in (FACTORS_FILE, OPTIMIZER_FILE, RUN_STATE, REPORT_FILE):
            (run / name).unlink(missing_ok=True)

    def checkpoint(step: int, optimizer) -> None:
        # factors first, state last: a crash in between leaves the previous state pointing at
        # factors that are at most one checkpoint newer, which the next resume would redo
        from safetensors.torch import save_file

        save_file(factors_of(layers), run / (FACTORS_FILE + ".tmp"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), run / (OPTIMIZER_FILE + ".tmp"))
        (run / (FACTORS_FILE + ".tmp")).replace(run / FACTORS_FILE)
        (run / (OPTIMIZER_FILE + ".tmp")).replace(run / OPTIMIZER_FILE)
        (run / (RUN_STATE + ".tmp")).write_text(json.dumps({"plan": plan, "step": step, "losses": losses}, indent=1))
        (run / (RUN_STATE + ".tmp")).replace(run / RUN_STATE)

    def step_done(step: int, loss: float) -> None:
        losses.append(loss)
        if on_step:
            on_step(step, steps, loss)

    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    if start < steps:
        sft(model, tokenizer, examples, steps=steps, batch_size=batch_size, lr=lr, max_length=max_length, seed=seed,
            on_step=step_done, params=params, start_step=start, optimizer_state=optimizer_state, checkpoint=checkpoint,
            checkpoint_every=save_every, loss=loss, block_size=block_size)
    report = Report(command="salora train", inputs={"aligned": str(aligned), "init": str(init_dir), "train_data": str(train_data)},
                    settings={**plan, "loss": loss, "device": str(dev)},
                    summary={"steps": steps, "resumed_from": start, "first_loss": losses[0] if losses else None,
                             "last_loss": losses[-1] if losses else None, "modules": len(layers)},
                    output=str(run))
    report.timings = {"total_s": round(time.perf_counter() - started, 4)}
    (run / REPORT_FILE).write_text(report.to_json())
    return report
