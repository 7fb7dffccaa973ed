"""`realign repair`: the setting chosen to the user's target from calibration data
(`realign.repair`); exit 0 written, 1 no candidate met the target, 2 bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import realign
from realign.report import format_rate

from . import endpoint as ep
from . import options as opt
from .output import EXIT_GATE_FAILED, Output, check_report_path, write_report

group = typer.Typer()


def _default(name: str):
    return opt.default_of(realign.repair, name)


@group.command("repair")
def repair(
    base: str = opt.base("Base (unaligned) model."),
    aligned: str = opt.aligned("Aligned model directory, or a PEFT adapter that aligns BASE."),
    adapter: str = opt.adapter("Fine-tuned PEFT LoRA adapter trained on ALIGNED.", opt.REQUIRED),
    out: Optional[Path] = opt.out("Where the chosen repair goes, with repair_report.json and repair_pareto.png.", None),
    target_refusal: float = typer.Option(opt.REQUIRED, "--target-refusal", help="Refusal rate on --harmful-cal to reach, in (0, 1]."),
    harmful_cal: str = typer.Option(opt.REQUIRED, "--harmful-cal", help="Harmful calibration prompts (a source, as for eval)."),
    benign_cal: Optional[str] = typer.Option(None, "--benign-cal", help="Benign calibration prompts, e.g. benign:dev."),
    task_cal: Optional[str] = typer.Option(None, "--task-cal", help="JSONL of task prompts and answers: the score to keep."),
    max_over_refusal: float = typer.Option(_default("max_over_refusal"), "--max-over-refusal",
                                           help="Most refusals allowed on --benign-cal."),
    methods: str = typer.Option(",".join(_default("methods")), "--methods", help="Comma-separated methods to search."),
    budget: int = typer.Option(_default("budget"), "--budget", help="Most candidates to evaluate."),
    max_new_tokens: int = typer.Option(_default("max_new_tokens"), "--max-new-tokens", help="Tokens generated per prompt (greedy)."),
    batch_size: int = opt.batch_size(_default("batch_size")),
    best_effort: bool = typer.Option(False, "--best-effort", help="With no candidate meeting the target, write the one that refused most."),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json(),
    force: bool = opt.force(),
    quiet: bool = opt.quiet(),
    endpoint: Optional[str] = ep.url(),
    served_model: Optional[str] = ep.served_model(),
    api_key_env: Optional[str] = ep.api_key_env(),
    concurrency: int = ep.concurrency(),
    request_timeout: float = ep.request_timeout(),
    max_retries: int = ep.max_retries(),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help="With --endpoint: where candidate adapters are written for "
                                                                    "the server to load (it must read them at this path); "
                                                                    "default a temporary directory here."),
) -> None:
    """Choose a repair to a refusal target on calibration data and write it (exit 1 when none meets it).

    Candidates are evaluated here, on ALIGNED loaded once, or on a server (--endpoint) that loads
    each one as a LoRA adapter at run time (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
    served = ep.build(endpoint, served_model, api_key_env, concurrency, request_timeout, max_retries)
    check_report_path(report_path, [base, aligned, adapter], [out])
    ui = Output(quiet, as_json)
    log = None if quiet or as_json else (lambda message: ui.err.print(f"repair: {message}", markup=False))
    result = realign.repair(base, aligned, adapter, out, target_refusal=target_refusal, harmful_cal=harmful_cal, benign_cal=benign_cal,
                            task_cal=task_cal, max_over_refusal=max_over_refusal, methods=opt.parse_targets(methods), budget=budget,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, best_effort=best_effort, device=device, force=force,
                            log=log, endpoint=served, lora_dir=lora_dir,
                            device_map=device_map, max_memory=max_memory)
    write_report(report_path, result)
    ui.notes(result)
    _show(ui, result)
    if result.summary["verdict"] != "pass":
        raise typer.Exit(EXIT_GATE_FAILED)


def _show(ui: Output, report) -> None:
    table = Table(title="realign repair (calibration rates)", title_justify="left")
    columns = ("candidate", "refusal", "over-refusal", "task", "coherence", "note")
    for column in columns:
        table.add_column(column)
    plain = ["\t".join(columns)]
    for row in report.metrics:
        note = "written" if row["chosen"] else ("meets the target" if row["meets_target"] else (row["stopped_early"] or ""))
        cells = [row["candidate"], format_rate(row["refusal"]), format_rate(row["over_refusal"]), format_rate(row["task"]),
                 "-" if row["coherence"] is None else f"{row['coherence']:.2f}", note]
        table.add_row(*cells)
        plain.append("\t".join(cells))
    s = report.summary
    line = (f"repair: {s['verdict'].upper()}: {s['candidates_evaluated']} candidates ({s['stopped_early']} stopped early); "
            + (f"chose {s['chosen']}" if s["chosen"] else "none met the target")
            + (f"; wrote {report.output}" if report.output else "") + f"; {report.timings.get('total_s', 0):.1f}s")
    ui.show(report, table, plain, line)
