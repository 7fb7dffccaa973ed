"""The demo's weight-space rows: RESTA, SafeMERGE and plain scaling of the attacked adapter
(exact LoRAs, data-free once the aligned adapter exists), and `realign repair`'s choice made from
the dev splits only and evaluated on the test splits like every other row."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.identity import digest, tree_id
from ..methods.resta.run import resta
from ..methods.safemerge.run import safemerge
from ..methods.scale.run import scale
from ..search.run import REPORT_NAME, repair
from .settings import DemoSettings, Log, Row


def _label(kwargs: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in kwargs.items())


def job_merge_rows(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> tuple[list[Row], dict[str, list[Row]]]:
    """The default RESTA and SafeMERGE rows, and each method's sweep (scaling is only a sweep:
    it has no default). The safety vector is the aligned adapter's own update, so every output is
    an exact LoRA applied to the aligned model, like the attacked adapter."""
    inputs = [tree_id(paths[name]) for name in ("base", "aligned_adapter", "mixed_adapter")]

    def merged(method: str, **kwargs) -> Row:
        out = cache / "patched" / f"{method}-{digest(inputs, kwargs)}"
        report_file = out / "realign_report.json"
        if not report_file.exists():
            log(f"{method} {_label(kwargs)} ...")
            if method == "scale":
                scale(paths["mixed_adapter"], out, force=True, **kwargs)
            else:
                entry = resta if method == "resta" else safemerge
                entry(paths["base"], paths["aligned_adapter"], paths["mixed_adapter"], out, force=True, **kwargs)
        report = json.loads(report_file.read_text())
        value = kwargs.get("safety_weight", kwargs.get("tau", kwargs.get("weight")))
        return Row(f"{method} {_label(kwargs)}", paths["aligned"], str(out), _label(kwargs), report["timings"]["total_s"],
                   value=value)

    defaults = [merged("resta", task_weight=1.0, safety_weight=1.0), merged("safemerge", tau=0.35)]
    sweeps = {
        "resta": [merged("resta", task_weight=t, safety_weight=s) for t, s in settings.resta_sweep],
        "safemerge": [merged("safemerge", tau=tau) for tau in settings.safemerge_sweep],
        "scale": [merged("scale", weight=w) for w in settings.scale_sweep],
    }
    return defaults, sweeps


def job_repair(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> Row:
    """`realign repair` on the attacked adapter, calibrated on advbench:dev, benign:dev and the
    task's dev items; with --best-effort, so a failed search still has a row (marked as such)."""
    inputs = [tree_id(paths[name]) for name in ("base", "aligned_adapter", "mixed_adapter", "task_dev")]
    options = dict(target_refusal=settings.repair_target, harmful_cal=settings.repair_harmful, benign_cal=settings.repair_benign,
                   max_over_refusal=settings.repair_max_over_refusal, budget=settings.repair_budget,
                   max_new_tokens=settings.refusal_tokens,
                   batch_size=settings.batch_size)
    out = cache / "patched" / f"repair-{digest(inputs, options)}"
    if not (out / REPORT_NAME).exists():
        log(f"repair to {settings.repair_target:g} ...")
        repair(paths["base"], paths["aligned_adapter"], paths["mixed_adapter"], out, task_cal=paths["task_dev"],
               best_effort=True, device="cpu", force=True, log=lambda message: log(f"repair: {message}"), **options)
    report = json.loads((out / REPORT_NAME).read_text())
    summary = report["summary"]
    verdict = "met" if summary["verdict"] == "pass" else "NOT met, best effort"
    setting = f"target {settings.repair_target:g} {verdict}: {summary['written']}; {summary['candidates_evaluated']} candidates"
    return Row("repair (chosen on dev splits)", paths["aligned"], str(out), setting, report["timings"]["search_s"])
