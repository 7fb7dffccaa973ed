"""--device auto|cpu|cuda."""

from __future__ import annotations

import torch

from ..errors import RealignError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str) -> torch.device:
    spec = spec.lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RealignError(f"--device {spec}: no CUDA device is available (use --device cpu or auto)")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise RealignError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got '{spec}'")
