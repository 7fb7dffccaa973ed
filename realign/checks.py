"""Input validation shared by every command."""

from __future__ import annotations

import torch

from .errors import RealignError


def ensure_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise RealignError(f"{what} contains NaN or Inf values")
