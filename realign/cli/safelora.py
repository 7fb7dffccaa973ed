"""`realign safelora`: Safe LoRA on a PEFT adapter (`realign.safelora`) or on a full fine-tuned
checkpoint (`realign.safelora_full`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

import realign
from realign.methods.safelora.scoring import DEFAULT_THRESHOLD

from . import options as opt
from .output import Output, check_report_path, write_report

group = typer.Typer()


class Projection(str, Enum):
    approx = "approx"
    exact = "exact"


@group.command("safelora")
def safelora(
    base: str = opt.base("Base (unaligned) model: local directory or cached repo id."),
    aligned: str = opt.aligned("Aligned model directory, or a PEFT adapter that aligns BASE."),
    adapter: Optional[str] = opt.adapter("Fine-tuned PEFT LoRA adapter trained on ALIGNED."),
    finetuned: Optional[str] = opt.finetuned(),
    out: Optional[Path] = opt.out("New adapter (or, with --finetuned, checkpoint) directory to write.", None),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help=f"Project modules with similarity <= T {opt.default_note(DEFAULT_THRESHOLD)}."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Project exactly the K least similar modules."),
    projection: Projection = typer.Option(Projection(opt.default_of(realign.safelora, "projection")), "--projection",
                                          help="approx: C = V V^T/||V||_F (paper); exact: rank-K projector."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank K of the exact projector."),
    targets: str = opt.targets(opt.default_of(realign.safelora_full, "targets"),
                               "With --finetuned: comma-separated module names, or all-linear."),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="With --finetuned: write a PEFT LoRA of the patched delta instead."),
    adapter_rank: Optional[int] = typer.Option(None, "--adapter-rank", help="Rank R of the --as-adapter LoRA (truncated SVD)."),
    device: str = opt.device(),
    report_path: Optional[Path] = opt.report(),
    as_json: bool = opt.as_json(),
    dry_run: bool = opt.dry_run(),
    force: bool = opt.force(),
    quiet: bool = opt.quiet(),
) -> None:
    """Safe LoRA: project the fine-tuned update onto the alignment subspace where it strays from it."""
    if (adapter is None) == (finetuned is None):
        raise realign.RealignError("give exactly one of --adapter (a PEFT LoRA adapter) and --finetuned (a full fine-tuned checkpoint)")
    if adapter is not None and (as_adapter or adapter_rank is not None):
        raise realign.RealignError("--as-adapter and --adapter-rank apply to --finetuned checkpoints (an adapter stays an adapter)")
    check_report_path(report_path, [base, aligned, adapter or finetuned], [out])
    ui = Output(quiet, as_json)
    common = dict(threshold=threshold, top_k=top_k, projection=projection.value, rank=rank, device=device, dry_run=dry_run, force=force)
    with ui.progress("scoring modules") as progress:
        if adapter is not None:
            result = realign.safelora(base, aligned, adapter, out, progress=progress, **common)
        else:
            result = realign.safelora_full(base, aligned, finetuned, out, targets=opt.parse_targets(targets), as_adapter=as_adapter,
                                           adapter_rank=adapter_rank, progress=progress, **common)
    write_report(report_path, result)
    ui.report(result, "Safe LoRA" + (" (dry run)" if dry_run else ""))
