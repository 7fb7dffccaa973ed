"""`realign eval`: refusal, over-refusal and task accuracy of a model (`realign.evaluate`); a CI
gate with --fail-below."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import realign
from realign.report import Report, format_rate

from . import endpoint as ep
from . import options as opt
from .output import EXIT_GATE_FAILED, Output, check_report_path, write_report

group = typer.Typer()


def _default(name: str):
    return opt.default_of(realign.evaluate, name)


@group.command("eval")
def eval_command(
    model: Optional[str] = typer.Option(None, "--model", help="Model directory (or GGUF directory, or cached repo id); "
                                                               "with --endpoint it only names the model in the report."),
    adapter: Optional[str] = opt.adapter("PEFT adapter applied to MODEL (merged in memory)."),
    harmful: list[str] = typer.Option([], "--harmful",
                                      help="Harmful prompt source (repeatable): advbench[:train|:test], harmbench, donotanswer, a file, "
                                           "hf:ORG/NAME; @N keeps N."),
    benign: list[str] = typer.Option([], "--benign",
                                     help="Benign prompt source for over-refusal (repeatable), e.g. 'benign' or a file."),
    task: Optional[str] = typer.Option(None, "--task", help="JSONL with prompt and answer, scored by exact match after normalisation."),
    judge: str = typer.Option(_default("judge"), "--judge", help="'keyword' (GCG prefixes + extensions) or a local judge LM path."),
    max_new_tokens: int = typer.Option(_default("max_new_tokens"), "--max-new-tokens"),
    batch_size: int = opt.batch_size(_default("batch_size")),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Write every prompt and response here (JSONL)."),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json(),
    fail_below: Optional[float] = typer.Option(None, "--fail-below", help="Exit 1 when the pooled harmful refusal rate is below RATE."),
    quiet: bool = opt.quiet(),
    endpoint: Optional[str] = ep.url(),
    served_model: Optional[str] = ep.served_model(),
    api_key_env: Optional[str] = ep.api_key_env(),
    concurrency: int = ep.concurrency(),
    request_timeout: float = ep.request_timeout(),
    max_retries: int = ep.max_retries(),
) -> None:
    """Refusal rate on harmful prompts, over-refusal on benign prompts, task accuracy; a CI gate with --fail-below.

    The model runs here (--model) or on a server that already serves it (--endpoint, --served-model)."""
    served = ep.build(endpoint, served_model, api_key_env, concurrency, request_timeout, max_retries)
    if fail_below is not None and not 0.0 <= fail_below <= 1.0:
        raise realign.RealignError("--fail-below must be a rate between 0 and 1")
    if fail_below is not None and not harmful:
        raise realign.RealignError("--fail-below gates the harmful refusal rate: give at least one --harmful source")
    check_report_path(report_path, [model, adapter], [responses])
    ui = Output(quiet, as_json)
    with ui.progress("generating") as progress:
        result = realign.evaluate(
            model, adapter, harmful=harmful, benign=benign, task=task, judge=judge,
            max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, responses=responses, progress=progress, endpoint=served,
            device_map=device_map, max_memory=max_memory,
            warn=lambda message: None if quiet else ui.err.print(f"realign: note: {message}", markup=False),
        )
    write_report(report_path, result)
    _show_metrics(ui, result)
    if fail_below is not None:
        pooled = result.summary["harmful_refusal"]["rate"]
        if pooled < fail_below:
            if not quiet:
                ui.err.print(f"realign: gate failed: harmful refusal rate {pooled:.3f} is below {fail_below}", markup=False)
            raise typer.Exit(EXIT_GATE_FAILED)


def _show_metrics(ui: Output, report: Report) -> None:
    table = Table(title="Evaluation", title_justify="left")
    for column in ("source", "kind", "measures", "rate [95% CI] (k/n)", "coherence"):
        table.add_column(column)
    plain = ["source\tkind\tmeasures\trate\tci_low\tci_high\tk\tn\tcoherence"]
    for m in report.metrics:
        coherence = f"{m['coherence']:.3f}" if m.get("coherence") is not None else "-"
        table.add_row(m["source"], m["kind"], m["measures"], format_rate(m), coherence)
        plain.append(f"{m['source']}\t{m['kind']}\t{m['measures']}\t{m['rate']:.4f}\t{m['ci95'][0]:.4f}\t{m['ci95'][1]:.4f}\t{m['k']}\t{m['n']}"
                     f"\t{coherence}")
    s = report.summary
    parts = [f"{label} {format_rate(s[key])}" for key, label in
             (("harmful_refusal", "harmful refusal"), ("over_refusal", "over-refusal"), ("task_accuracy", "task accuracy")) if s.get(key)]
    parts.append(f"{report.timings.get('total_s', 0):.1f}s")
    ui.show(report, table, plain, "; ".join(parts))
