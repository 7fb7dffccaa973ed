"""SaLoRA's training: A and B of every SaLoRA layer trained with C frozen, checkpointed and resumable."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ...calibration.examples import data_path, load_examples
from ...errors import RealignError
from ...io.device import resolve_device
from ...io.jsonfile import load_json_object
from ...io.models import load_causal_lm, release
from ...io.placement import placement, placement_note
from ...io.output import check_target
from ...io.tagged import read_stage_safetensors
from ...io.torchfile import torch_load
from ...report import REPORT_FILE, Report
from ...training import BATCHING, LOSSES, LR_SCHEDULES, sft, training_items
from .layer import FACTORS_FILE, attach, factors_of, read_init


RUN_STATE = "state.json"


OPTIMIZER_FILE = "optimizer.pt"


# Long but linear: check, plan the run (and compare it with a run to resume), attach the layers,
# train with checkpoints, report.
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
    lr_schedule: str = "constant",
    device_map: str | None = None,
    max_memory: str | None = None,
) -> Report:
    """Train A and B of every SaLoRA layer (C frozen) with a response-only loss (or, with
    loss="full", the reference's full-sequence loss on packed `block_size` blocks); checkpoints to
    RUN_DIR every `save_every` steps and at the end; an interrupted run resumes where it stopped
    (the same batches, the optimizer state restored) unless `restart`.

    `lr_schedule`: "constant" (default: `lr` at every step, what realign's testbed was measured
    with) or "linear" (decayed to zero over the run, as the reference's Trainer does).

    `device_map` and `max_memory` spread the model over devices (docs/dispatch.md): each SaLoRA
    layer lives on the device its layer computes on, whole, even where the frozen weights around
    it are offloaded."""

    started = time.perf_counter()
    if not epochs > 0 or not lr > 0 or batch_size < 1 or max_length < 2 or save_every < 0:
        raise RealignError("--epochs and --lr must be positive, --batch-size at least 1, --max-length at least 2")
    if loss not in LOSSES:
        raise RealignError(f"--loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    if lr_schedule not in LR_SCHEDULES:
        raise RealignError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{lr_schedule}'")
    settings_init, _, _, _ = read_init(init_dir)
    examples = load_examples(train_data, "training data")
    if max_steps is not None and max_steps < 1:
        raise RealignError("--max-steps must be at least 1")
    dev = resolve_device(device)
    placed = placement(device_map, max_memory, device)
    model, tokenizer, directory = load_causal_lm(aligned, dev, role="aligned", placement=placed)
    try:
        # an epoch is the examples, or with the full loss the packed blocks they make
        items = len(examples) if loss == "response" else len(training_items(tokenizer, examples, loss, max_length, block_size))
        steps = max_steps if max_steps is not None else max(1, math.ceil(epochs * items / batch_size))
        run = Path(run_dir).expanduser()
        plan = {"init": str(Path(init_dir).expanduser().resolve()), "train_data_sha256": hashlib.sha256(data_path(train_data).read_bytes()).hexdigest(),
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed, "steps": steps,
                "batching": BATCHING, **({"loss": loss, "block_size": block_size} if loss != "response" else {}),
                **({"lr_schedule": lr_schedule} if lr_schedule != "constant" else {})}
        state = _read_state(run / RUN_STATE, steps) if (run / RUN_STATE).is_file() and not restart else None
        if state is not None and state["plan"] != plan:
            raise RealignError(f"'{run_dir}' holds a run with other settings or data; use --restart to start over")
        if run.exists() and state is None and any(run.iterdir()) and not restart:
            raise RealignError(f"'{run_dir}' exists and is not a SaLoRA run; use --restart to replace it")
        check_target(run, True, [directory, Path(init_dir), data_path(train_data)])
        factors = None
        if state is not None and (run / FACTORS_FILE).is_file():
            saved = read_stage_safetensors(run / FACTORS_FILE, "SaLoRA run factors")
            missing = next((p for p in settings_init["modules"] if p + ".lora_A" not in saved or p + ".lora_B" not in saved), None)
            if missing is not None:
                raise RealignError(f"SaLoRA run factors '{run / FACTORS_FILE}' have no factors for '{missing}'; use --restart to start over")
            factors = {p: (saved[p + ".lora_A"], saved[p + ".lora_B"]) for p in settings_init["modules"]}
        layers = attach(model, init_dir, factors)
        start = state["step"] if state else 0
        losses = state["losses"] if state else []
        optimizer_state = torch_load(run / OPTIMIZER_FILE, "SaLoRA optimizer state", map_location=dev) if start else None
        if start and not isinstance(optimizer_state, dict):
            raise RealignError(f"SaLoRA optimizer state '{run / OPTIMIZER_FILE}' is not an optimizer state dict; use --restart")
        if state is None:  # RUN_DIR itself appears with the first checkpoint: a run that fails before leaves nothing
            for name in (FACTORS_FILE, OPTIMIZER_FILE, RUN_STATE, REPORT_FILE):
                (run / name).unlink(missing_ok=True)

        def checkpoint(step: int, optimizer) -> None:
            # factors first, state last: a crash in between leaves the previous state pointing at
            # factors that are at most one checkpoint newer, which the next resume would redo
            run.mkdir(parents=True, exist_ok=True)

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
                checkpoint_every=save_every, loss=loss, block_size=block_size, lr_schedule=lr_schedule)
        layout = placement_note(model)
        report = Report(command="salora train", inputs={"aligned": str(aligned), "init": str(init_dir), "train_data": str(train_data)},
                        settings={**plan, "loss": loss, "lr_schedule": lr_schedule, "device": str(dev)},
                        summary={"steps": steps, "resumed_from": start, "first_loss": losses[0] if losses else None,
                                 "last_loss": losses[-1] if losses else None, "modules": len(layers)},
                        output=str(run), notes=[layout] if layout else [])
        report.timings = {"total_s": round(time.perf_counter() - started, 4)}
        run.mkdir(parents=True, exist_ok=True)
        (run / REPORT_FILE).write_text(report.to_json())
        return report
    finally:
        release(model)


def _read_state(path: Path, steps: int) -> dict:
    """A run's state.json: the plan it was started with, the step reached and its losses."""
    state = load_json_object(path, "SaLoRA run state")
    step, losses = state.get("step"), state.get("losses")
    if not isinstance(state.get("plan"), dict) or not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step) \
            or not isinstance(losses, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses):
        raise RealignError(f"SaLoRA run state '{path}' is damaged (expected plan, step and losses); use --restart to start over")
    return state
