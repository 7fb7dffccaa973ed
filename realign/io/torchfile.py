"""The one reader of torch pickles (legacy `.bin` weights, a training run's optimizer state):
always `weights_only=True`, so no code in the file runs, and every failure is one line that
never suggests loading it unsafely."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import RealignError

# the keys a training script wraps a state dict in ({"state_dict": sd, "epoch": 3}, ...)
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


def torch_load(path: Path, what: str, *, mmap: bool = False, map_location="cpu"):
    """The object in a torch pickle, restricted to tensors and plain containers."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise RealignError(f"{what} '{path}' holds Python objects other than tensors and plain values, which realign "
                           "will not unpickle (code could run); convert it to safetensors") from None
    except Exception as exc:  # torch raises several types for corrupt or truncated files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RealignError(f"{what}: cannot load '{path}', truncated or not a torch file ({reason})") from None


def _has_tensors(value) -> bool:
    return isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values())


def load_state_dict(path: Path, what: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a `.bin` state dict: a `{"state_dict": sd, ...}` wrapper is unwrapped, and
    entries that are not tensors (an epoch counter, a name) are left out."""
    state = torch_load(path, what, mmap=mmap)
    if isinstance(state, dict) and not _has_tensors(state):
        state = next((state[k] for k in _WRAPPERS if _has_tensors(state.get(k))), state)
    if not isinstance(state, dict):
        raise RealignError(f"{what}: '{path}' does not hold a state dict (a dict of tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise RealignError(f"{what}: '{path}' holds no tensors")
    return tensors
