"""`realign salora`: the safety module (`realign.salora_module`), the task-specific init
(`realign.salora_init`), training (`realign.salora_train`), export (`realign.salora_export`) and
the post-hoc projection of an existing adapter (`realign.salora_apply`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import realign

from . import options as opt
from .output import Output

group = typer.Typer(name="salora", help="SaLoRA: a fixed safety module, task-specific init, training and export.", no_args_is_help=True)



def _module(name: str):
    return opt.default_of(realign.salora_module, name)


def _init(name: str):
    return opt.default_of(realign.salora_init, name)


def _train(name: str):
    return opt.default_of(realign.salora_train, name)


@group.command("module")
def salora_module(
    aligned: str = opt.aligned("Aligned model directory (or cached repo id)."),
    safety_data: str = opt.safety_data("JSONL with prompt and a safe response (or messages); @N keeps N."),
    out: Path = opt.out("Module file to write (safetensors)."),
    targets: str = opt.targets(_module("targets"), "Comma-separated module names, or all-linear."),
    rank_safety: int = typer.Option(_module("rank_safety"), "--rank-safety", help="r_s: dimension of the safety subspace per module."),
    max_samples: Optional[int] = opt.max_samples("safety"),
    max_response_tokens: int = opt.max_response_tokens(_module("max_response_tokens")),
    batch_size: int = opt.batch_size(_module("batch_size")),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    force: bool = opt.force(),
    as_json: bool = opt.as_json(),
    quiet: bool = opt.quiet(),
) -> None:
    """One pass over safety data; V_s of every target module from batched eigendecompositions."""
    ui = Output(quiet, as_json)
    with ui.progress("calibration") as progress:
        result = realign.salora_module(aligned, safety_data, out, targets=targets, rank_safety=rank_safety, max_samples=max_samples,
                                       max_response_tokens=max_response_tokens, batch_size=batch_size, device=device, force=force,
                                       progress=progress, device_map=device_map, max_memory=max_memory)
    s = result.summary
    ui.done(result, f"safety module for {s['modules']} modules (r_s {rank_safety}) from {s['response_tokens']} response "
                    f"tokens of {s['examples']} examples; wrote {out}; {result.timings['total_s']:.1f}s")


@group.command("init")
def salora_init(
    aligned: str = opt.aligned("The aligned model the module was computed on."),
    module: Path = opt.salora_module(),
    task_data: Optional[str] = typer.Option(None, "--task-data", help="JSONL with prompt and response of the task."),
    out: Path = opt.out("Init directory to write."),
    task_from: Optional[Path] = typer.Option(None, "--task-from",
                                             help="An earlier init of the same model, rank and --rank-task: reuse its task factors "
                                                  "(no task pass), e.g. to sweep --rank-safety."),
    rank: int = typer.Option(_init("rank"), "--rank"),
    alpha: float = typer.Option(_init("alpha"), "--alpha"),
    rank_task: int = typer.Option(_init("rank_task"), "--rank-task"),
    max_samples: Optional[int] = opt.max_samples("task"),
    batch_size: int = opt.batch_size(_init("batch_size")),
    task_pass: str = typer.Option(_init("task_pass"), "--task-pass",
                                  help="'one-pass' (every Sigma_t on the aligned model) or 'sequential' (the reference's: block by block, "
                                       "earlier blocks at W_res; reports the overlap with one-pass)."),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    force: bool = opt.force(),
    as_json: bool = opt.as_json(),
    quiet: bool = opt.quiet(),
) -> None:
    """Task-specific initialisation: (A0, B0), W_res and the module in INIT_DIR."""
    ui = Output(quiet, as_json)
    with ui.progress("task pass") as progress:
        result = realign.salora_init(aligned, module, task_data, out, task_from=task_from, rank=rank, alpha=alpha, rank_task=rank_task,
                                     max_samples=max_samples, batch_size=batch_size, device=device, force=force, task_pass=task_pass,
                                     progress=progress, device_map=device_map, max_memory=max_memory)
    ui.done(result, f"initialised {result.summary['modules']} modules (r {rank}, alpha {alpha}); wrote {out}; {result.timings['total_s']:.1f}s")


@group.command("train")
def salora_train(
    aligned: str = opt.aligned(),
    init: Path = opt.salora_init(),
    train_data: str = typer.Option(opt.REQUIRED, "--train-data", help="JSONL with prompt and response."),
    out: Path = opt.out("Run directory (checkpoints; an interrupted run resumes here)."),
    epochs: float = typer.Option(_train("epochs"), "--epochs"),
    lr: float = typer.Option(_train("lr"), "--lr"),
    lr_schedule: str = typer.Option(_train("lr_schedule"), "--lr-schedule",
                                    help="'constant' (LR at every step) or 'linear' (decayed to zero over the run, as the reference)."),
    batch_size: int = opt.batch_size(_train("batch_size")),
    max_length: int = typer.Option(_train("max_length"), "--max-length"),
    seed: int = opt.seed(_train("seed")),
    save_every: int = typer.Option(_train("save_every"), "--save-every", help="Checkpoint every N steps (and at the end)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Train exactly N steps (overrides --epochs)."),
    restart: bool = typer.Option(False, "--restart", help="Start over instead of resuming."),
    loss: str = typer.Option(_train("loss"), "--loss",
                             help="'response' (response tokens only) or 'full' (every token of packed blocks, as the reference trains)."),
    block_size: int = typer.Option(_train("block_size"), "--block-size", help="With --loss full: tokens per packed block (the reference's 128)."),
    device: str = opt.device(),
    device_map: Optional[str] = opt.device_map(),
    max_memory: Optional[str] = opt.max_memory(),
    as_json: bool = opt.as_json(),
    quiet: bool = opt.quiet(),
) -> None:
    """Train A and B with C frozen (response-only loss, or --loss full); resumable."""
    ui = Output(quiet, as_json)
    with ui.progress("training") as progress:
        result = realign.salora_train(aligned, init, train_data, out, epochs=epochs, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size,
                                      max_length=max_length, seed=seed, save_every=save_every, max_steps=max_steps, device=device,
                                      restart=restart, loss=loss, block_size=block_size, device_map=device_map, max_memory=max_memory,
                                      on_step=lambda step, total, value: progress(step, total, description=f"loss {value:.3f}"))
    s = result.summary
    losses = f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}" if s["last_loss"] is not None else "nothing left to train"
    ui.done(result, f"trained {s['steps']} steps (from step {s['resumed_from']}); {losses}; run in {out}; {result.timings['total_s']:.1f}s")


@group.command("export")
def salora_export(
    init: Path = opt.salora_init(),
    run_dir: Path = typer.Option(opt.REQUIRED, "--run"),
    out: Path = opt.out("Standard PEFT adapter on the original aligned model."),
    force: bool = opt.force(),
    as_json: bool = opt.as_json(),
    quiet: bool = opt.quiet(),
) -> None:
    """Fold W_res + s C B A into a rank-2r PEFT LoRA on the original aligned weights."""
    result = realign.salora_export(init, run_dir, out, force=force)
    Output(quiet, as_json).done(result, f"exported {result.summary['modules']} modules as a rank-{result.settings['rank']} adapter; wrote {out}")


@group.command("apply")
def salora_apply(
    module: Path = opt.salora_module(),
    adapter: str = opt.adapter(default=opt.REQUIRED),
    out: Optional[Path] = opt.out(default=None),
    dry_run: bool = opt.dry_run(),
    force: bool = opt.force(),
    as_json: bool = opt.as_json(),
    quiet: bool = opt.quiet(),
) -> None:
    """Post-hoc B' = (I - V_s V_s^T) B on an existing adapter (cheap; not the paper's method)."""
    result = realign.salora_apply(module, adapter, out, dry_run=dry_run, force=force)
    s = result.summary
    written = f"wrote {out}" if out and not dry_run else "dry run: nothing written"
    Output(quiet, as_json).done(result, f"projected {s['projected']} of {s['modules']} modules; {written}")
