"""What every method provides, and the one registry the API, the CLI and the repair search find
methods in (in the spirit of mergekit's merge-method registry).

A method is a package under realign/methods/ whose __init__.py registers one `Method`: its name,
what it needs, the public function that runs it, and its named stages. Registration names the
functions by "module:attribute" and imports nothing, so importing a method's package stays cheap
and free of import cycles; `Method.run` resolves the function on first use.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import RealignError

# What a method may need. Names are the keyword the API function takes.
INPUTS = {
    "base": "the unaligned base model (directory or cached repo id)",
    "aligned": "the aligned model, or a PEFT adapter that aligns BASE",
    "aligned_adapter": "the aligned PEFT adapter on BASE (a LoRA alignment)",
    "adapter": "the fine-tuned PEFT LoRA adapter",
    "finetuned": "a full fine-tuned checkpoint",
    "safety_data": "calibration data: harmful prompts with safe responses (JSONL)",
    "task_data": "the fine-tuning task's examples (JSONL)",
}

# the methods that ship with realign, imported (and so registered) by `registered()`
BUILTIN = ("safelora", "nlsr", "salora", "scale", "resta", "safemerge")


def resolve(reference: str) -> Callable:
    """The object named by "package.module:attribute"."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Method:
    name: str  # registry key and command name
    title: str  # how people write it, e.g. "Safe LoRA"
    summary: str  # one line
    reference: str  # the paper
    inputs: tuple[str, ...]  # keys of INPUTS, in the order the API function takes them
    entry: str | None  # "module:function" of the public API function that runs the whole method (None: stages only)
    stages: Mapping[str, str] = field(default_factory=dict)  # stage name -> "module:function"
    data_free: bool = True  # needs no calibration data and no forward pass (cheap to search over)
    planner: str | None = None  # "module:function" taking the entry's arguments but OUT and the run flags, returning the
    # plan the patch driver runs (`realign repair` evaluates such methods in memory through it)
    auto_cli: bool = False  # the CLI builds its command from the entry function's signature
    help: Mapping[str, str] = field(default_factory=dict)  # help text of each setting, for that command

    def __post_init__(self) -> None:
        unknown = [i for i in self.inputs if i not in INPUTS]
        if unknown:
            raise ValueError(f"method '{self.name}': unknown input '{unknown[0]}' (known: {', '.join(INPUTS)})")

    @property
    def run(self) -> Callable:
        if self.entry is None:
            raise RealignError(f"{self.title} runs in stages ({', '.join(self.stages)}), not in one call")
        return resolve(self.entry)

    def plan(self, inputs: dict[str, str], settings: dict) -> Callable:
        """The method's plan for these inputs (by name) and settings; see `planner`."""
        if self.planner is None:
            raise RealignError(f"{self.title} cannot be planned in memory (it needs calibration data or training)")
        return resolve(self.planner)(*(inputs[name] for name in self.inputs), **settings)

    def stage(self, name: str) -> Callable:
        return resolve(self.stages[name])

    def settings(self) -> dict[str, inspect.Parameter]:
        """The entry function's keyword-only parameters (its knobs), with their defaults and types."""
        parameters = inspect.signature(self.run).parameters.values()
        return {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY and REGISTRY[method.name] != method:
        raise ValueError(f"a method named '{method.name}' is registered already")
    REGISTRY[method.name] = method
    return method


def registered() -> dict[str, Method]:
    """Every registered method by name, the built-in ones included."""
    for name in BUILTIN:
        importlib.import_module(f"{__package__}.{name}")
    return dict(REGISTRY)


def get(name: str) -> Method:
    methods = registered()
    if name not in methods:
        raise RealignError(f"unknown method '{name}' (known: {', '.join(sorted(methods))})")
    return methods[name]
