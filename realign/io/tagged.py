"""Safetensors files that realign writes for its own stages (NLSR masks, SaLoRA safety modules):
tagged in their metadata with what they are and their format version, so a wrong or stale file
is refused with one clear line."""

from __future__ import annotations

from pathlib import Path

from ..errors import RealignError


def read_tagged_safetensors(path, what: str, tag: str, version_key: str, version: str, writer: str):
    """(tensors, metadata) of a safetensors file that realign wrote with metadata
    realign=`tag` and `version_key`=`version`; one clear error for anything else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise RealignError(f"{what} '{path}' does not exist")
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
