"""Reusable CPU buffers for a pass that handles one module at a time.

A fresh tensor the size of a 7B MLP weight (180 MB in float32) costs about 0.1 s of page faults
when first written, more than the conversion or sum written into it (bf16 -> float32 of an
11008 x 4096 weight: 0.12 s into a fresh tensor, 0.016 s into a reused one, one core). A pass that
takes its large temporaries from named slots here pays that once per slot instead of once per
module. A tensor taken from a slot is overwritten the next time the slot is taken: it must not
outlive the module it was taken for.
"""

from __future__ import annotations

import math

import torch


class Buffers:
    def __init__(self) -> None:
        self._slots: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor of `shape` and `dtype` (uninitialised), the storage of `slot`,
        grown to the largest request so far."""
        count = math.prod(shape)
        buffer = self._slots.get((slot, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = self._slots[(slot, dtype)] = torch.empty(count, dtype=dtype)
        return buffer[:count].view(shape)
