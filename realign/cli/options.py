"""Options that more than one command takes, each defined once: `force: bool = opt.force()`.

A default value (a number, a name, a choice) is read from the library, never written a second
time: NLSR's from `Selection` and `RegionSettings`, the amplification from `DEFAULT_AMPLIFY`, the
rest from the signature of the function the command calls (`default_of`), in this module or in the
command's own, so the command line and the Python API cannot drift apart (tests/test_cli.py checks
every command). Only "not given" is written out: None, an empty list, a flag's False. Where the
wording differs between commands (what --base or --out is), the command passes its own help.

The modules these defaults come from import torch, so importing this module does too.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from realign.methods.nlsr.amplify import DEFAULT_AMPLIFY
from realign.methods.nlsr.math import Selection
from realign.methods.nlsr.regions import RegionSettings

# typer's marker for an option without a default: the command fails without it
REQUIRED: Any = ...


def default_of(function: Callable[..., Any], name: str) -> Any:
    """The default of parameter NAME of a library function or dataclass."""
    return inspect.signature(function).parameters[name].default


def default_note(value: object) -> str:
    """'[default: VALUE]' for a help text whose option defaults to None (typer shows nothing
    then); escaped, since typer reads help texts as rich markup."""
    return escape(f"[default: {value}]")


def parse_targets(value: str) -> tuple[str, ...]:
    """--targets 'q_proj, v_proj' -> ('q_proj', 'v_proj')."""
    return tuple(t.strip() for t in value.split(",") if t.strip())


# -- inputs and outputs -------------------------------------------------------------------------


def base(help: Optional[str] = None, default: Any = REQUIRED) -> Any:
    return typer.Option(default, "--base", help=help)


def aligned(help: Optional[str] = None) -> Any:
    return typer.Option(REQUIRED, "--aligned", help=help)


def adapter(help: Optional[str] = None, default: Any = None) -> Any:
    return typer.Option(default, "--adapter", help=help)


def finetuned() -> Any:
    return typer.Option(None, "--finetuned", help="Or: a full fine-tuned checkpoint of ALIGNED.")


def aligned_adapter(help: str, default: Any = REQUIRED) -> Any:
    return typer.Option(default, "--aligned-adapter", help=help)


def reference(help: str) -> Any:
    return typer.Option(REQUIRED, "--reference", help=help)


def masks(help: str, default: Any = REQUIRED) -> Any:
    return typer.Option(default, "--masks", help=help)


def safety_data(help: str = "JSONL with prompt and response (or messages); @N keeps N.", default: Any = REQUIRED) -> Any:
    return typer.Option(default, "--safety-data", help=help)


def salora_module() -> Any:
    return typer.Option(REQUIRED, "--module", help="Module file from `realign salora module`.")


def salora_init() -> Any:
    return typer.Option(REQUIRED, "--init", help="Init directory from `realign salora init`.")


def out(help: Optional[str] = None, default: Any = REQUIRED) -> Any:
    return typer.Option(default, "--out", help=help)


def report() -> Any:
    return typer.Option(None, "--report", help="Also write the JSON report to this file.")


def targets(default: tuple[str, ...], help: str) -> Any:
    """Module names, comma-separated on the command line (see parse_targets)."""
    return typer.Option(",".join(default), "--targets", help=help)


def cache_dir(help: str) -> Any:
    return typer.Option(None, "--cache-dir", help=f"{help} {default_note('~/.cache/realign/testbed')}.")


# -- how to run --------------------------------------------------------------------------------


def device() -> Any:
    return typer.Option("auto", "--device", help="auto, cpu or cuda.")


def device_map() -> Any:
    return typer.Option(None, "--device-map",
                        help="Spread the model over the GPUs, the CPU and disk with accelerate: auto, balanced or sequential "
                             "(docs/dispatch.md). Needs --device auto.")


def max_memory() -> Any:
    return typer.Option(None, "--max-memory",
                        help="Budget per device for --device-map, e.g. 0:70GiB,1:70GiB,cpu:200GiB (alone: --device-map auto); "
                             "what fits nowhere is offloaded to a temporary folder.")


def batch_size(default: int) -> Any:
    return typer.Option(default, "--batch-size")


def max_samples(examples: str) -> Any:
    return typer.Option(None, "--max-samples", help=f"Use the first N {examples} examples.")


def max_response_tokens(default: int) -> Any:
    return typer.Option(default, "--max-response-tokens")


def seed(default: int) -> Any:
    return typer.Option(default, "--seed")


ATTACKS_OWN = default_note("the attack's")


def attack_steps(default: Optional[int], help: Optional[str] = None) -> Any:
    if help is None and default is None:
        help = f"Steps of the attack's training {ATTACKS_OWN}."
    return typer.Option(default, "--attack-steps", help=help)


def attack(default: str) -> Any:
    from realign.testbed.stages import ATTACK_PRESETS

    return typer.Option(default, "--attack", help="The fine-tune that erodes the refusals: " + "; ".join(
        f"{name} (poison {p['poison']:g}, lr {p['attack_lr']:g}, {p['attack_steps']} steps)" for name, p in ATTACK_PRESETS.items()) + ".")


# -- what to print and whether to write ----------------------------------------------------------


def as_json(help: str = "Print the JSON report to stdout.") -> Any:
    return typer.Option(False, "--json", help=help)


def quiet(help: str = "Print nothing but errors (and --json).") -> Any:
    return typer.Option(False, "--quiet", "-q", help=help)


def dry_run(help: str = "Compute and print, write nothing.") -> Any:
    return typer.Option(False, "--dry-run", help=help)


def force() -> Any:
    return typer.Option(False, "--force", help="Replace OUT if it exists.")


# -- NLSR: `realign nlsr` and its stages ---------------------------------------------------------


def amplify() -> Any:
    return typer.Option(DEFAULT_AMPLIFY, "--amplify", help="Factor on the aligned update dW (sqrt of it on each factor).")


def sparsity() -> Any:
    return typer.Option(default_of(RegionSettings, "sparsity"), "--sparsity", help="Fraction of each factor outside its safety region.")


def regions() -> Any:
    return typer.Option(default_of(RegionSettings, "mode"), "--regions",
                        help="one-pass, or sequential (layer by layer, as the reference code).")


def nlsr_batch_size() -> Any:
    return batch_size(default_of(RegionSettings, "batch_size"))


def nlsr_max_response_tokens() -> Any:
    return max_response_tokens(default_of(RegionSettings, "max_response_tokens"))


def prune_rate() -> Any:
    return typer.Option(default_of(Selection, "prune_rate"), "--prune-rate", help="P_L: expected fraction of modules patched.")


def epsilon() -> Any:
    return typer.Option(default_of(Selection, "epsilon"), "--epsilon", help="Adaptive probabilities span P_L +- epsilon.")


def selection() -> Any:
    return typer.Option(default_of(Selection, "rule"), "--selection",
                        help="adaptive: Bernoulli draws, likelier for less similar modules; threshold: similarity < TAU; "
                             "lowest: the PRUNE_RATE least similar.")


def tau() -> Any:
    return typer.Option(default_of(Selection, "tau"), "--tau", help="Threshold rule: patch where similarity < TAU.")


def direction() -> Any:
    return typer.Option(default_of(Selection, "direction"), "--direction",
                        help="paper: least similar likeliest; reference: the reference code's reverse.")


def nlsr_seed() -> Any:
    return seed(default_of(Selection, "seed"))
