"""The fine-tuned side of a weight-space merge as a FULL fine-tuned checkpoint: T = W_finetuned -
W_aligned (dense, float32) on the modules Safe LoRA's full path covers (its `FullSource`: every
linear layer of the numbered blocks), read one module at a time. Every other tensor of the
fine-tuned checkpoint is carried over unchanged.

`open_side` picks the side from the user's --adapter / --finetuned (exactly one of them).
"""

from __future__ import annotations

import torch

from ..errors import RealignError
from ..io.targets import ALL_LINEAR
from .merging import AdapterSide, MergeModule
from .safelora.full import FullSource, score
from .safelora.math import Settings

_CPU = torch.device("cpu")


class FullSide:
    """The fine-tuned side as a full checkpoint of ALIGNED."""

    kind = "finetuned"
    dense = True  # T is dense: T' is built again, one module at a time, when written
    unwritable = ("the fine-tuned checkpoint is in .bin files; a merged checkpoint is written only from safetensors "
                  "(convert it, or use --as-adapter --adapter-rank R)")

    def __init__(self, base: str, aligned: str, finetuned: str):
        self.source = FullSource(base, aligned, finetuned, (ALL_LINEAR,))
        self.alignment = self.source.alignment
        self._planned = {m.name: m for m in self.source.modules}
        self.modules = [MergeModule(m.name, m.shape, None, m.finetuned.transposed) for m in self.source.modules]
        self.fan_in_fan_out = any(m.finetuned.transposed for m in self.source.modules)  # GPT-2's Conv1D
        self.names = {"base": str(base), "aligned": str(aligned), "finetuned": str(finetuned)}
        self.directories = self.source.directories
        self.passthrough: dict[str, str] = {}
        self.target = self.source.finetuned  # what a merged checkpoint is a copy of
        self._similarities: dict[str, tuple[float | None, str | None]] | None = None

    def stored(self, name: str):
        """Where module `name`'s weight is in the fine-tuned checkpoint."""
        return self._planned[name].finetuned

    def task(self, module: MergeModule) -> torch.Tensor:
        """T = W_finetuned - W_aligned, float32 [out, in]."""
        return self.source.update(self._planned[module.name], _CPU)

    def similarity(self, module: MergeModule) -> tuple[float | None, str | None]:
        """Safe LoRA's cos(T, C T) against V = W_aligned - W_base (approx projection), computed for
        every module on first use by Safe LoRA's own full-checkpoint scoring."""
        if self._similarities is None:
            scores = score(self.source, Settings(), _CPU)
            self._similarities = {s.name: (s.similarity, s.skip_reason) for s in scores}
        return self._similarities[module.name]


def open_side(base: str, aligned: str, adapter: str | None, finetuned: str | None) -> AdapterSide | FullSide:
    """The fine-tuned side: a LoRA adapter (`adapter`) or a full checkpoint (`finetuned`)."""
    check_one_finetune(adapter, finetuned)
    return AdapterSide(base, aligned, adapter) if adapter is not None else FullSide(base, aligned, finetuned)


def check_one_finetune(adapter: str | None, finetuned: str | None) -> None:
    if (adapter is None) == (finetuned is None):
        raise RealignError("give exactly one of --adapter (a PEFT LoRA adapter) and --finetuned (a full fine-tuned checkpoint)")
