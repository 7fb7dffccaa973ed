"""`realign audit`: the weight-only safety-drift gate (`realign.audit`); exit 1 when it fails."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import realign
from realign.report import Report, format_similarity

from . import options as opt
from .output import EXIT_GATE_FAILED, Output, check_report_path, write_report

group = typer.Typer()


class AuditFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    github = "github"


@group.command("audit")
def audit(
    base: str = opt.base("Base (unaligned) model."),
    aligned: str = opt.aligned("Aligned model directory, or a PEFT adapter that aligns BASE."),
    adapter: Optional[str] = opt.adapter("Fine-tuned PEFT LoRA adapter trained on ALIGNED."),
    finetuned: Optional[str] = opt.finetuned(),
    min_similarity: float = typer.Option(opt.default_of(realign.AuditPolicy, "min_similarity"), "--min-similarity",
                                         help="A module drifted when its similarity is below this."),
    max_drifted: str = typer.Option(opt.default_of(realign.AuditPolicy, "max_drifted"), "--max-drifted",
                                    help="Fail when more modules drifted: a percentage or a count."),
    aligned_adapter: Optional[str] = opt.aligned_adapter("NLSR reference adapter (with --masks).", None),
    masks: Optional[str] = opt.masks("Masks from `realign nlsr regions` for the region similarity.", None),
    min_region_similarity: Optional[float] = typer.Option(None, "--min-region-similarity", help="Also drifted below this region similarity."),
    targets: str = opt.targets(opt.default_of(realign.audit, "targets"), "With --finetuned: comma-separated module names, or all-linear."),
    device: str = opt.device(),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json("Same as --format json."),
    output_format: AuditFormat = typer.Option(AuditFormat.table, "--format",
                                              help="table, json, markdown (PR comment) or github (annotations + step summary)."),
    quiet: bool = opt.quiet("Print nothing; the exit code says it all."),
) -> None:
    """Weight-only safety-drift gate: exit 0 pass, 1 policy failed, 2 bad input."""
    from realign.drift.gate import FAIL

    check_report_path(report_path, [base, aligned, adapter or finetuned])
    policy = realign.AuditPolicy(min_similarity, max_drifted, min_region_similarity)
    result = realign.audit(base, aligned, adapter, finetuned, policy=policy, targets=opt.parse_targets(targets),
                           aligned_adapter=aligned_adapter, masks=masks, device=device)
    write_report(report_path, result)
    if not quiet:
        _render(result, AuditFormat.json if as_json else output_format)
    if result.summary["verdict"] == FAIL:
        raise typer.Exit(EXIT_GATE_FAILED)


def _render(report: Report, fmt: AuditFormat) -> None:
    from realign.drift import render

    if fmt is AuditFormat.json:
        sys.stdout.write(report.to_json())
    elif fmt is AuditFormat.markdown:
        sys.stdout.write(render.to_markdown(report))
    elif fmt is AuditFormat.github:
        sys.stdout.write(render.to_github(report))
        summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_file:
            render.write_step_summary(report, summary_file)
        else:
            sys.stdout.write(render.to_markdown(report))
    else:
        _show_table(Output(False, False), report)


def _show_table(ui: Output, report: Report) -> None:
    from realign.drift.render import headline

    with_regions = any(r["region_similarity"] is not None for r in report.modules)
    table = Table(title="Safety drift audit", title_justify="left")
    for column in ("module", "similarity") + (("region similarity",) if with_regions else ()) + ("drifted",):
        table.add_column(column, justify="left" if column == "module" else "right")
    plain = ["module\tsimilarity" + ("\tregion_similarity" if with_regions else "") + "\tdrifted"]
    for r in report.modules:
        cells = [r["name"], format_similarity(r["similarity"])] + ([format_similarity(r["region_similarity"])] if with_regions else [])
        table.add_row(*cells, "[bold red]yes[/]" if r["drifted"] else "-")
        plain.append("\t".join(cells + ["yes" if r["drifted"] else "no"]))
    ui.show(report, table, plain, headline(report) + f"; {report.timings.get('total_s', 0):.1f}s")
