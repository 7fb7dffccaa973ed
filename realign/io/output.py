"""Atomic output: write into a temporary sibling, then rename into place.

A failed or interrupted run leaves nothing at the target; an existing target is replaced only
with force, and never when it is (or holds, or sits inside) one of the inputs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import RealignError


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_target(target: Path, force: bool, inputs: list[Path], what: str = "output") -> None:
    resolved = target.expanduser().resolve()
    for source in inputs:
        if _related(resolved, source.expanduser().resolve()):
            raise RealignError(f"{what} '{target}' overlaps the input '{source}'; inputs are never modified")
    if resolved.exists() and not force:
        raise RealignError(f"{what} '{target}' already exists (use --force to replace it)")


@contextmanager
def atomic_directory(target: Path, force: bool, inputs: list[Path]) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `target` when the block succeeds."""
    check_target(target, force, inputs)
    target = target.expanduser().resolve()
    created = [p for p in reversed(target.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                pass
        raise


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, trash / "old")
    os.replace(staging, target)
    shutil.rmtree(trash, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors_atomic(path: Path, tensors: dict, metadata: dict[str, str], force: bool, inputs: list[Path]) -> None:
    """A safetensors file written to a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    check_target(path, force, inputs)
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
