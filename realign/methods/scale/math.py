"""Scaling (WiSE-FT-style interpolation, Wortsman et al., CVPR 2022) as a pure tensor function:
T' = a T for the fine-tuned delta T. On a LoRA, dW = s B A, so scaling B by a scales dW by a
exactly; A, s and the config stay as they are."""

from __future__ import annotations

import torch


def scaled(b: torch.Tensor, weight: float) -> torch.Tensor:
    """a B in float32 (the writer casts it back to the adapter's dtype)."""
    return b.to(torch.float32) * weight
