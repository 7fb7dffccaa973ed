"""Which linear layers a method targets: by path suffix, or every linear layer in a numbered
block ("all-linear", PEFT's meaning: the output head is left out)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RealignError
from .names import natural_key
from .placement import module_tensor

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    """A targeted linear layer: its path in the model, the module, and how its weight is stored."""

    path: str
    module: torch.nn.Module
    transposed: bool  # GPT-2 Conv1D stores [in, out]

    def weight(self) -> torch.Tensor:
        """[out, in], float32, on the device the module computes on (read from its offload map
        when accelerate offloaded it)."""
        w = module_tensor(self.module, "weight").detach().float()
        return w.T if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        d0, d1 = self.module.weight.shape
        return (d1, d0) if self.transposed else (d0, d1)

    def bias(self) -> torch.Tensor | None:
        bias = module_tensor(self.module, "bias")
        return None if bias is None else bias.detach()


def find_targets(model, targets: tuple[str, ...]) -> list[Target]:
    """Linear layers whose path ends with one of `targets` ('all-linear': every linear layer in
    a numbered block). A target that matches nothing is an error."""
    from transformers.pytorch_utils import Conv1D

    linear = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    found: dict[str, Target] = {}
    for target in targets:
        if target == ALL_LINEAR:
            hits = [n for n in linear if any(part.isdigit() for part in n.split("."))]
        else:
            hits = [n for n in linear if n == target or n.endswith("." + target)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise RealignError(f"target '{target}' matches no linear module of the model (its linear modules: {', '.join(known)})")
        for name in hits:
            found[name] = Target(name, linear[name], isinstance(linear[name], Conv1D))
    return [found[n] for n in sorted(found, key=natural_key)]
