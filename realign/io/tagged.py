"""Safetensors files that realign writes for its own stages (NLSR masks, SaLoRA safety modules):
tagged in their metadata with what they are and their format version, so a wrong or stale file
is refused with one clear line."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RealignError
from .jsonfile import parse_json
from .files import require_file


def read_tagged_safetensors(path, what: str, tag: str, version_key: str, version: str, writer: str):
    """(tensors, metadata) of a safetensors file that realign wrote with metadata
    realign=`tag` and `version_key`=`version`; one clear error for anything else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = require_file(path, what)  # missing, a directory, a FIFO, a loop: each said as what it is
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise RealignError(f"{what} '{path}' is truncated or not a safetensors file ({exc})") from None
    if metadata.get("realign") != tag:
        raise RealignError(f"'{path}' is not a {what} written by `{writer}`")
    if metadata.get(version_key) != version:
        raise RealignError(f"{what} '{path}' has format version {metadata.get(version_key)}, expected {version}")
    return tensors, metadata


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_stage_tensors(tensors: dict, what: str, path, dims: int | None = 2) -> None:
    """Stage tensors realign computes with (residuals, factors, safety bases): floating point,
    free of NaN and Inf, and `dims`-dimensional; one line naming the file otherwise."""
    for key, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise RealignError(f"{what} '{path}': '{key}' is {str(tensor.dtype).replace('torch.', '')}, expected floating point")
        if dims is not None and tensor.dim() != dims:
            raise RealignError(f"{what} '{path}': '{key}' has shape {tuple(tensor.shape)}, expected a {dims}-D tensor")
        if not bool(torch.isfinite(tensor).all()):
            raise RealignError(f"{what} '{path}': '{key}' contains NaN or Inf values")


def read_stage_safetensors(path, what: str, dims: int | None = 2) -> dict:
    """The tensors of a safetensors stage file (a SaLoRA residual or factors), checked by
    `check_stage_tensors`; one line naming the file for anything unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise RealignError(f"{what} '{path}' does not exist or is not a regular file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise RealignError(f"{what} '{path}' is truncated or not a safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    check_stage_tensors(tensors, what, path, dims)
    return tensors


def metadata_json(metadata: dict, key: str, what: str, path) -> dict:
    """A JSON object stored as a string in a stage file's metadata (settings, statistics)."""
    value = parse_json(metadata.get(key, "{}"), f"{what} '{path}' (metadata '{key}')")
    if not isinstance(value, dict):
        raise RealignError(f"{what} '{path}': metadata '{key}' is not a JSON object")
    return value
