"""The adapters NLSR works on: the aligned (or reference) adapter and the fine-tuned one that
resumed training from it. Checked for what NLSR needs (linear LoRA modules, finite factors, the
same modules, ranks and scaling) and paired by module name."""

from __future__ import annotations

import torch

from ...errors import RealignError
from ...io.adapter import Adapter, LoraModule
from ...io.names import find_module, natural_key
from . import math as method


def check_patchable(adapter: Adapter, role: str) -> None:
    """NLSR needs every LoRA tensor to be a linear module's factor: regions come from forward
    hooks on linear LoRA layers, and the patch copies factor entries."""
    for key, why in adapter.passthrough.items():
        if "embedding LoRA" in why or "convolution LoRA" in why:
            raise RealignError(f"{role} has {why.split(' (')[0]} ('{key}'); NLSR handles linear LoRA modules only")
    adapter.ensure_finite(role)


_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")


def check_same_layout(reference: Adapter, fine_tuned: Adapter, reference_role: str) -> dict[str, LoraModule]:
    """NLSR's setting: the fine-tuned adapter resumed training from the aligned one, so both
    share modules, ranks and scaling. Returns fine-tuned module name -> reference module."""
    for key in _CONFIG_KEYS:
        ours, theirs = reference.config.get(key), fine_tuned.config.get(key)
        if (ours or None) != (theirs or None):
            raise RealignError(
                f"the {reference_role} and the fine-tuned adapter differ in {key} ({ours!r} vs {theirs!r}); NLSR needs "
                "a fine-tuned adapter that continued training from the aligned one"
            )
    names = {m.name for m in reference.modules}
    pairs: dict[str, LoraModule] = {}
    for module in fine_tuned.modules:
        found = find_module(module.name, names, reference_role)
        if found is None:
            raise RealignError(f"module '{module.name}' of the fine-tuned adapter is not in the {reference_role}")
        own = reference.module(found)
        if (own.rank, own.d_out, own.d_in) != (module.rank, module.d_out, module.d_in):
            raise RealignError(
                f"module '{module.name}': the {reference_role} has rank {own.rank} ({own.d_out}x{own.d_in}) and the "
                f"fine-tuned adapter rank {module.rank} ({module.d_out}x{module.d_in})"
            )
        pairs[module.name] = own
    if len(pairs) != len(reference.modules):
        extra = sorted(names - {p.name for p in pairs.values()}, key=natural_key)
        raise RealignError(f"the {reference_role} has modules the fine-tuned adapter lacks (e.g. '{extra[0]}')")
    return pairs


def load_pair(reference: str, role: str, adapter: str) -> tuple[Adapter, Adapter, dict[str, LoraModule]]:
    """The reference (or aligned) adapter and the fine-tuned one, both patchable, with the same
    layout; and the fine-tuned module name -> reference module map."""
    ref = Adapter.load(reference, role)
    check_patchable(ref, role)
    fine_tuned = Adapter.load(adapter, "adapter")
    check_patchable(fine_tuned, "adapter")
    return ref, fine_tuned, check_same_layout(ref, fine_tuned, role)


def amplified_tensors(aligned: Adapter, factor: float) -> dict[str, torch.Tensor]:
    """The reference adapter's factors: every module's update scaled by `factor`."""
    replaced = {}
    for module in aligned.modules:
        a, b = method.amplify(aligned.tensors[module.key_a], aligned.tensors[module.key_b], factor)
        replaced[module.key_a], replaced[module.key_b] = a, b
    return replaced
