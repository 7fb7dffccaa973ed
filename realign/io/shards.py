"""A patched copy of a safetensors checkpoint: the directory copied except the bytes of the
replaced tensors, each replaced tensor then written into its own bytes. Untouched tensors, shards,
the index and side files stay byte for byte, and memory holds one replaced tensor at a time."""

from __future__ import annotations

import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch

from ..buffers import Buffers
from ..errors import ensure_finite
from ..report import REPORT_FILE
from .checkpoint import SAFETENSORS_INDEX, Checkpoint

_CHUNK = 16 * 2**20
# Files of a training run that do not belong in a patched model directory.
_NOT_COPIED = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin", REPORT_FILE}


def copy_checkpoint(checkpoint: Checkpoint, staging: Path, left_out: Iterable[str] = ()) -> None:
    """Copy the checkpoint's files into `staging`, except the bytes of the tensors in `left_out`:
    those are left as holes (zeros) of the right size, for `write_over` to fill. A patch that
    writes every module over its copy would otherwise read and write those bytes twice (half of
    a merge's output, measured at 7B shape)."""
    holes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key in left_out:
        holes[checkpoint.file_of(key)].append(checkpoint.byte_range(key))
    for path in checkpoint.directory.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED:
            if path.name in holes:
                _copy_around(path, staging / path.name, sorted(holes[path.name]))
            else:
                shutil.copyfile(path, staging / path.name)


def _copy_around(source: Path, target: Path, holes: list[tuple[int, int]]) -> None:
    """`source` into `target`, every byte but those of the sorted, disjoint [start, end) `holes`."""
    size = source.stat().st_size
    with open(source, "rb", buffering=0) as reader, open(target, "wb", buffering=0) as writer:
        writer.truncate(size)
        position = 0
        for start, end in [*holes, (size, size)]:
            _copy_range(reader, writer, position, start - position)
            position = end


def _copy_range(reader, writer, offset: int, count: int) -> None:
    """`count` bytes at `offset` of `reader` to the same offset of `writer` (unbuffered files):
    in the kernel where it can (Linux's sendfile, as shutil.copyfile does), else in chunks."""
    writer.seek(offset)
    if sys.platform.startswith("linux"):
        while count > 0:
            sent = os.sendfile(writer.fileno(), reader.fileno(), offset, min(count, _CHUNK))
            if sent == 0:  # pragma: no cover - the file shrank while being copied
                raise OSError(f"{reader.name}: ended {count} bytes early")
            offset, count = offset + sent, count - sent
        return
    reader.seek(offset)
    while count > 0:
        chunk = reader.read(min(count, _CHUNK))
        if not chunk:  # pragma: no cover - the file shrank while being copied
            raise OSError(f"{reader.name}: ended {count} bytes early")
        writer.write(chunk)
        count -= len(chunk)


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
