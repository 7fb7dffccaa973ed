"""`realign nlsr`: NLSR in one go (`realign.nlsr`), or stage by stage: `amplify`
(`realign.nlsr_amplify`), `regions` (`realign.nlsr_regions`), `patch` (`realign.nlsr_patch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import realign
from realign.report import Report, format_similarity

from . import options as opt
from .output import Output, adapter_and_output, check_report_path, write_report

group = typer.Typer(
    name="nlsr",
    help="NLSR: transplant the aligned adapter's safety regions into the fine-tuned adapter where they drifted.",
    invoke_without_command=True,
)


@group.callback()
def nlsr(
    ctx: typer.Context,
    base: Optional[str] = opt.base("Base model the aligned adapter was trained on.", None),
    aligned_adapter: Optional[str] = opt.aligned_adapter("Aligned PEFT adapter on BASE.", None),
    adapter: Optional[str] = opt.adapter("Fine-tuned adapter that continued training from ALIGNED_ADAPTER."),
    safety_data: Optional[str] = opt.safety_data(default=None),
    out: Optional[Path] = opt.out("New adapter directory to write.", None),
    amplify: float = opt.amplify(),
    sparsity: float = opt.sparsity(),
    prune_rate: float = opt.prune_rate(),
    epsilon: float = opt.epsilon(),
    selection: str = opt.selection(),
    tau: float = opt.tau(),
    direction: str = opt.direction(),
    regions: str = opt.regions(),
    seed: int = opt.nlsr_seed(),
    batch_size: int = opt.nlsr_batch_size(),
    max_samples: Optional[int] = opt.max_samples("safety"),
    max_response_tokens: int = opt.nlsr_max_response_tokens(),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json(),
    dry_run: bool = opt.dry_run("Compute and print, write no adapter."),
    force: bool = opt.force(),
    quiet: bool = opt.quiet(),
) -> None:
    """NLSR in one go (amplify, regions, patch); or run the stages one by one with the subcommands."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [flag for flag, value in (("--base", base), ("--aligned-adapter", aligned_adapter), ("--adapter", adapter),
                                        ("--safety-data", safety_data)) if value is None]
    if missing:
        raise realign.RealignError(f"missing option {missing[0]} (see realign nlsr --help)")
    check_report_path(report_path, [base, aligned_adapter, adapter], [out])
    ui = Output(quiet, as_json)
    with ui.progress("calibration") as progress:
        result = realign.nlsr(
            base, aligned_adapter, adapter, safety_data, out, amplify_factor=amplify, sparsity=sparsity, regions_mode=regions,
            max_response_tokens=max_response_tokens, max_samples=max_samples, batch_size=batch_size, selection=selection,
            prune_rate=prune_rate, epsilon=epsilon, tau=tau, direction=direction, seed=seed, device=device, dry_run=dry_run,
            force=force, progress=progress, device_map=device_map, max_memory=max_memory,
        )
    write_report(report_path, result)
    ui.notes(result)
    ui.show(result, *_patch_table(result, "NLSR" + (" (dry run)" if dry_run else "")), _patch_summary(result))


@group.command("amplify")
def nlsr_amplify(
    aligned_adapter: str = opt.aligned_adapter("Aligned PEFT adapter."),
    out: Path = opt.out("Reference adapter directory to write."),
    amplify: float = opt.amplify(),
    force: bool = opt.force(),
    as_json: bool = opt.as_json(),
    quiet: bool = opt.quiet(),
) -> None:
    """Write the reference adapter: the aligned adapter with its update scaled by AMPLIFY."""
    result = realign.nlsr_amplify(aligned_adapter, out, factor=amplify, force=force)
    ui = Output(quiet, as_json)
    ui.show(result, Table(), [], f"amplified {result.summary['modules']} modules by {amplify} (x{amplify ** 0.5:.4g} on each factor); wrote {out}")


@group.command("regions")
def nlsr_regions(
    base: str = opt.base("Base model the reference adapter applies to."),
    reference: str = opt.reference("Reference adapter (from `realign nlsr amplify`)."),
    safety_data: str = opt.safety_data(),
    out: Path = opt.out("Masks file to write (safetensors of booleans)."),
    sparsity: float = opt.sparsity(),
    regions: str = opt.regions(),
    batch_size: int = opt.nlsr_batch_size(),
    max_samples: Optional[int] = opt.max_samples("safety"),
    max_response_tokens: int = opt.nlsr_max_response_tokens(),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json(),
    force: bool = opt.force(),
    quiet: bool = opt.quiet(),
) -> None:
    """Find the safety region of every factor of the reference adapter; write the masks."""
    check_report_path(report_path, [base, reference], [out])
    ui = Output(quiet, as_json)
    with ui.progress("calibration") as progress:
        result = realign.nlsr_regions(base, reference, safety_data, out, sparsity=sparsity, mode=regions, max_response_tokens=max_response_tokens,
                                      max_samples=max_samples, batch_size=batch_size, device=device, force=force, progress=progress,
                                      device_map=device_map, max_memory=max_memory)
    write_report(report_path, result)
    ui.notes(result)
    s = result.summary
    ui.show(result, *_regions_table(result), f"masks for {s['modules']} modules from {s['response_tokens']} response tokens of "
                                             f"{s['examples']} examples ({s['passes']} pass(es)); wrote {out}; {result.timings['total_s']:.1f}s")


@group.command("patch")
def nlsr_patch(
    reference: str = opt.reference("Reference adapter the masks were computed from."),
    masks: Path = opt.masks("Masks file from `realign nlsr regions`."),
    adapter: str = opt.adapter("Fine-tuned adapter that continued training from the aligned one.", opt.REQUIRED),
    out: Optional[Path] = opt.out("New adapter directory to write.", None),
    prune_rate: float = opt.prune_rate(),
    epsilon: float = opt.epsilon(),
    selection: str = opt.selection(),
    tau: float = opt.tau(),
    direction: str = opt.direction(),
    seed: int = opt.nlsr_seed(),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Refuse masks computed with another sparsity."),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json(),
    dry_run: bool = opt.dry_run(),
    force: bool = opt.force(),
    quiet: bool = opt.quiet(),
) -> None:
    """Transplant the masked reference entries into the selected modules of the fine-tuned adapter."""
    check_report_path(report_path, [reference, str(masks), adapter], [out])
    result = realign.nlsr_patch(reference, masks, adapter, out, selection=selection, prune_rate=prune_rate, epsilon=epsilon, tau=tau,
                                direction=direction, seed=seed, sparsity=sparsity, dry_run=dry_run, force=force)
    write_report(report_path, result)
    ui = Output(quiet, as_json)
    ui.show(result, *_patch_table(result, "NLSR patch" + (" (dry run)" if dry_run else "")), _patch_summary(result))


def _regions_table(report: Report) -> tuple[Table, list[str]]:
    table = Table(title="NLSR safety regions", title_justify="left")
    for column in ("module", "q (A/B)", "eigen-gap (A/B)", "mask density (A/B)"):
        table.add_column(column)
    plain = ["module\tq_a\tq_b\tgap_a\tgap_b\tdensity_a\tdensity_b"]
    for row in report.modules:
        table.add_row(row["name"], "/".join(map(str, row["q"])), "/".join(f"{g:.2e}" for g in row["gap"]),
                      "/".join(f"{d:.3f}" for d in row["density"]))
        plain.append("\t".join([row["name"], *map(str, row["q"]), *(f"{g:.3e}" for g in row["gap"]), *(f"{d:.4f}" for d in row["density"])]))
    return table, plain


def _patch_table(report: Report, title: str) -> tuple[Table, list[str]]:
    table = Table(title=title, title_justify="left")
    for column, justify in (("module", "left"), ("similarity", "right"), ("p", "right"), ("patched", "center"), ("mask density A/B", "right")):
        table.add_column(column, justify=justify)
    plain = ["module\tsimilarity\tprobability\tpatched\tdensity_a\tdensity_b"]
    for row in report.modules:
        p = "-" if row["probability"] is None else f"{row['probability']:.3f}"
        density = "/".join(f"{d:.3f}" for d in row["mask_density"])
        table.add_row(row["name"], format_similarity(row["similarity"]), p, "[bold green]yes[/]" if row["patched"] else "-", density)
        plain.append(f"{row['name']}\t{format_similarity(row['similarity'])}\t{p}\t{'yes' if row['patched'] else 'no'}\t"
                     + "\t".join(f"{d:.4f}" for d in row["mask_density"]))
    return table, plain


def _patch_summary(report: Report) -> str:
    s, settings = report.summary, report.settings
    rule = {"adaptive": f"adaptive, P_L {settings['prune_rate']} +- {settings['epsilon']}, {settings['direction']} direction",
            "threshold": f"similarity < {settings['tau']}", "lowest": f"lowest {settings['prune_rate']:.0%}"}[s["selection"]]
    parts = [f"patched {s['patched']} of {s['modules']} modules ({rule})",
             f"similarity min {s['min_similarity']:.4f} mean {s['mean_similarity']:.4f} max {s['max_similarity']:.4f}",
             f"mask density {s['mask_density']:.3f}"]
    if s.get("skipped"):
        parts.append(f"{s['skipped']} skipped")
    return "; ".join(parts + adapter_and_output(report))
