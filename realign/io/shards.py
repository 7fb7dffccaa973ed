"""A patched copy of a safetensors checkpoint: the directory copied, each replaced tensor written
over its own bytes. Untouched tensors, shards, the index and side files stay byte for byte, and
memory holds one replaced tensor at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..buffers import Buffers
from ..errors import ensure_finite
from ..report import REPORT_FILE
from .checkpoint import SAFETENSORS_INDEX, Checkpoint

# Files of a training run that do not belong in a patched model directory.
_NOT_COPIED = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin", REPORT_FILE}


def copy_checkpoint(checkpoint: Checkpoint, staging: Path) -> None:
    for path in checkpoint.directory.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED:
            shutil.copyfile(path, staging / path.name)


def write_over(checkpoint: Checkpoint, staging: Path, key: str, tensor: torch.Tensor, buffers: Buffers | None = None) -> None:
    """Write `tensor` (any float dtype, the stored shape) over `key` in the copy in `staging`,
    cast to the stored dtype (in `buffers`' slot "stored" where given)."""
    dtype = checkpoint.dtype(key)
    if buffers is not None:
        tensor = buffers.take("stored", tuple(tensor.shape), dtype).copy_(tensor)
    else:
        tensor = tensor.to("cpu", dtype).contiguous()
    ensure_finite(tensor, f"patched weight '{key}' in {dtype}")
    start, end = checkpoint.byte_range(key)
    raw = tensor.view(torch.uint8).numpy()
    if raw.nbytes != end - start:  # pragma: no cover - same dtype and shape by construction
        raise AssertionError(f"{key}: {raw.nbytes} bytes for a {end - start}-byte slot")
    with open(staging / checkpoint.file_of(key), "r+b") as handle:
        handle.seek(start)
        handle.write(raw.reshape(-1))  # the array's own buffer: no bytes copy of the whole tensor


def layout(checkpoint: Checkpoint, replaced: list[str]) -> dict:
    """How many shards there are, how many a patch with `replaced` keys rewrote, and whether
    the checkpoint is indexed."""
    return {"shards": len(checkpoint.files()), "shards_rewritten": len({checkpoint.file_of(k) for k in replaced}),
            "index": (checkpoint.directory / SAFETENSORS_INDEX).exists()}
