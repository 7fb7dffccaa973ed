"""SaLoRA's results as standard PEFT adapters: the trained factors folded into a rank-2r LoRA on
the original aligned weights, and the post-hoc projection of an existing adapter."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...errors import RealignError
from ...io.adapter import Adapter
from ...io.adapter_writer import lora_config, write_lora, write_patched
from ...io.names import find_module
from ...io.output import check_target
from ...io.tagged import read_stage_safetensors
from ...report import Report
from ..patch import Patch, run, total_time, write_output
from . import math as method
from .layer import FACTORS_FILE, read_init
from .module import read_module


def export(init_dir: str | Path, run_dir: str | Path, out: str | Path, *, force: bool = False) -> Report:
    """A standard PEFT LoRA adapter on the ORIGINAL aligned weights: W + s C (B A - B0 A0) as a
    rank-2r LoRA, re-factored in float64 and saved in float32."""

    started = time.perf_counter()
    settings, init_factors, _, bases = read_init(init_dir)
    run = Path(run_dir).expanduser()
    if not (run / FACTORS_FILE).is_file():
        raise RealignError(f"'{run_dir}' is not a SaLoRA run directory (no {FACTORS_FILE}; run `realign salora train`)")
    trained = read_stage_safetensors(run / FACTORS_FILE, "SaLoRA run factors")
    out = Path(out)
    inputs = [Path(init_dir), run]
    checked = check_target(out, force, inputs)
    rank, scaling = settings["rank"], settings["scaling"]
    folded, rows = {}, []
    for path in settings["modules"]:
        a, b = trained.get(path + ".lora_A"), trained.get(path + ".lora_B")
        if a is None or b is None:
            raise RealignError(f"the run has no trained factors for '{path}'")
        a0, b0 = init_factors[path]
        if a.shape != a0.shape or b.shape != b0.shape:
            raise RealignError(f"'{path}': the run's factors {tuple(b.shape)}x{tuple(a.shape)} do not fit the init")
        a2, b2 = method.fold_for_export(a, b, a0, b0, bases[path])  # rank min(2r, d_out, d_in): no more is possible
        folded[path] = (a2, b2)
        rows.append({"name": path, "rank": a2.shape[0], "delta_norm": float((b2 @ a2).norm() * scaling)})
    conv1d = bool(settings.get("conv1d"))
    config = lora_config(settings["modules"], 2 * rank, 2 * rank * scaling, fan_in_fan_out=conv1d, patterns=True)
    for path, (a2, _) in folded.items():  # a module narrower than 2r is exported at its own rank, the scaling kept
        config["rank_pattern"][path], config["alpha_pattern"][path] = a2.shape[0], a2.shape[0] * scaling
    report = Report(command="salora export", inputs={"init": str(init_dir), "run": str(run_dir)},
                    settings={"rank": 2 * rank, "lora_alpha": 2 * rank * scaling}, modules=rows,
                    summary={"modules": len(rows)}, output=str(out))
    write_output(out, force, inputs, report, lambda staging: write_lora(staging, config, folded), total_time(started), checked=checked)
    return report


class ApplyPatch(Patch):
    """B' = C B for every module of an adapter that the safety module covers."""

    def __init__(self, module_file: str | Path, adapter: str):
        self.names = {"module": str(module_file), "adapter": str(adapter)}
        self.bases, metadata = read_module(module_file)
        self.rank_safety = metadata["settings"].get("rank_safety")
        self.lora = Adapter.load(adapter, "adapter")
        self.module_file = Path(module_file)

    def inputs(self) -> list[Path]:
        return [self.lora.directory, self.module_file]

    def score(self, progress) -> tuple[list[dict], dict[str, torch.Tensor]]:
        replaced, rows = {}, []
        for m in self.lora.modules:
            found = find_module(m.name, self.bases, "safety module")
            if found is None:
                rows.append({"name": m.name, "projected": False, "removed_fraction": None, "skipped": "not covered by the safety module"})
                continue
            basis = self.bases[found]
            if basis.shape[0] != m.d_out:
                raise RealignError(f"module '{m.name}': the safety module is for {basis.shape[0]} outputs, the adapter has {m.d_out}; "
                                   "was it computed on another model?")
            b = self.lora.tensors[m.key_b]
            projected = method.project_out(basis.double(), b.double())
            before = float(b.double().square().sum())
            removed = 1.0 - float(projected.square().sum()) / before if before > 0 else 0.0
            replaced[m.key_b] = projected.float()
            rows.append({"name": m.name, "projected": True, "removed_fraction": removed, "skipped": None})
        if not replaced:
            raise RealignError("the safety module covers none of the adapter's modules")
        return rows, replaced

    def select(self, result) -> set[str]:
        return {row["name"] for row in result[0] if row["projected"]}

    def report(self, result, selected: set[str]) -> Report:
        rows, replaced = result
        return Report(command="salora apply", inputs=self.names, settings={"rank_safety": self.rank_safety}, modules=rows,
                      summary={"modules": len(rows), "projected": len(replaced)},
                      notes=["post-hoc projection B' = (I - V_s V_s^T) B of an existing adapter: cheap, but not SaLoRA "
                             "itself, which trains with the safety module in place"])

    def write(self, staging: Path, result, selected: set[str], report: Report) -> None:
        write_patched(self.lora, staging, result[1])


def apply(module_file: str | Path, adapter: str, out: str | Path | None = None, *, dry_run: bool = False, force: bool = False) -> Report:
    """B' = C B for every module of `adapter` that the safety module covers. Post-hoc and cheap;
    NOT the paper's method (SaLoRA trains with C in place)."""
    return run(lambda: ApplyPatch(module_file, adapter), out, dry_run=dry_run, force=force)
