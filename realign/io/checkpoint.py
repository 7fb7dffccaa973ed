"""Hugging Face model checkpoints read lazily, one tensor at a time, by name.

A checkpoint is a local directory or a repo id already in the local Hugging Face cache. Weights
are `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or the legacy
`pytorch_model*.bin` files (read with `weights_only=True`). Only headers are read up front;
each tensor is read on demand and the file is closed right after, so memory holds the tensors
in use and nothing else.
"""

from __future__ import annotations

import functools
import json
import os
import re
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import RealignError
from .jsonfile import load_json_object
from .torchfile import load_state_dict
from .files import member_path, require_file, require_regular_entries

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _TORCH_DTYPE_NAMES.items()}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def resolve_local(spec: str, role: str) -> Path:
    """A local directory, or the snapshot of a repo id in the local HF cache. Never downloads."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RealignError(f"{role} '{spec}' is a file; expected a model directory")
        require_regular_entries(path, role)  # transformers opens files of its own choosing: no FIFO among them
        return path
    if _REPO_ID.match(spec) and "/" in spec.split("@")[0]:
        repo_id, _, revision = spec.partition("@")
        try:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
        except Exception:  # the hub raises many types for "not cached"; all mean the same here
            snapshot = None
        if snapshot is not None:
            require_regular_entries(snapshot, role)
            return snapshot
        raise RealignError(
            f"{role} '{spec}' is neither a local directory nor a repo id in the local Hugging Face cache "
            "(realign never downloads)"
        )
    raise RealignError(f"{role} '{spec}' does not exist")


def read_json(path: Path, what: str) -> dict:
    return load_json_object(path, what)  # the one JSON reader (deep nesting, bad text: one line)


class Checkpoint:
    """Name -> tensor access to a model's weights without loading the model."""

    def __init__(self, directory: Path, role: str = "model"):
        self.directory = directory
        self.role = role
        self._bin_cache: tuple[str, dict] | None = None  # one legacy .bin shard at a time
        self._weight_map, self._format = self._index()

    @classmethod
    def open(cls, spec: str, role: str) -> "Checkpoint":
        return cls(resolve_local(spec, role), role)

    @cached_property
    def config(self) -> dict:
        path = self.directory / CONFIG
        return read_json(path, f"{self.role} config") if path.exists() else {}

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        return self._headers[key][0]

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored torch dtype of a floating-point tensor (None for other dtypes)."""
        return _DTYPES_BY_NAME.get(self._headers[key][1])

    def is_floating(self, key: str) -> bool:
        """False for integer-packed (quantized) weights, which cannot be subtracted meaningfully."""
        return self._headers[key][1] in _FLOAT_DTYPES

    def read(self, key: str) -> torch.Tensor:
        """One tensor, in its stored dtype, the caller's own: writing into it changes nothing else."""
        file = self._weight_map[key]
        path = self.directory / file
        try:
            if self._format == "safetensors":
                # The tensor is backed by the file's memory map and keeps only its own pages
                # mapped: memory follows the tensors in use, not the shard.
                with safe_open(path, framework="pt") as handle:
                    return handle.get_tensor(key)
            # the shard stays cached for the next key: hand out a copy, never the cached tensor
            # (an in-place update of a float32 .bin weight changed later reads of the same key)
            return self._bin_shard(file)[key].clone()
        except (SafetensorError, OSError, RuntimeError, KeyError) as exc:
            raise RealignError(f"{self.role} checkpoint: cannot read '{key}' from {path}: {exc}") from None

    # -- indexing -------------------------------------------------------------------------

    def _index(self) -> tuple[dict[str, str], str]:
        d = self.directory
        if (d / SAFETENSORS_INDEX).exists():
            return self._from_index(d / SAFETENSORS_INDEX), "safetensors"
        if (d / SAFETENSORS_SINGLE).exists():
            return self._from_files([SAFETENSORS_SINGLE]), "safetensors"
        loose = sorted(p.name for p in d.glob("*.safetensors") if not p.name.startswith("adapter_model"))
        if loose:
            return self._from_files(loose), "safetensors"
        if (d / BIN_INDEX).exists():
            return self._from_index(d / BIN_INDEX), "bin"
        if (d / BIN_SINGLE).exists():
            return {k: BIN_SINGLE for k in self._bin_shard(BIN_SINGLE)}, "bin"
        if (d / "adapter_config.json").exists():
            raise RealignError(f"{self.role} '{d}' is a PEFT adapter, not a model checkpoint")
        raise RealignError(
            f"{self.role} '{d}' is not a model directory (no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE})"
        )

    def _from_index(self, index_path: Path) -> dict[str, str]:
        index = read_json(index_path, f"{self.role} shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RealignError(f"{self.role} shard index '{index_path}' has no weight_map")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise RealignError(f"{self.role} shard index '{index_path}': the weight_map entry of '{bad}' is "
                               f"{json.dumps(weight_map[bad])[:40]}, not a shard file name")
        for file in sorted(set(weight_map.values())):  # plain names inside the directory: a patched copy writes OUT/<name>
            path = member_path(self.directory, file, f"{self.role} checkpoint: {index_path.name}")
            if not os.path.lexists(path):
                raise RealignError(f"{self.role} checkpoint: shard '{file}' listed in {index_path.name} is missing")
            require_file(path, f"{self.role} checkpoint: shard")
        return dict(weight_map)

    def _from_files(self, files: list[str]) -> dict[str, str]:
        weight_map = {}
        for file in files:
            for key in self._header(file):
                weight_map[key] = file
        return weight_map

    def _header(self, file: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """key -> (shape, dtype name as safetensors spells it)."""
        path = require_file(self.directory / file, f"{self.role} checkpoint file")
        try:
            with safe_open(path, framework="pt") as handle:
                return {k: (tuple(s.get_shape()), s.get_dtype()) for k in handle.keys() for s in [handle.get_slice(k)]}
        except (SafetensorError, OSError) as exc:
            raise RealignError(f"{self.role} checkpoint: '{path}' is truncated or not a safetensors file ({exc})") from None

    @cached_property
    def _headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every tensor; opening each shard's header also catches truncated shards early."""
        headers: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self._weight_map.values())):
            if self._format == "safetensors":
                header = self._header(file)
            else:
                header = {k: (tuple(v.shape), _TORCH_DTYPE_NAMES.get(v.dtype, str(v.dtype))) for k, v in self._bin_shard(file).items()}
            for key, file_of_key in self._weight_map.items():
                if file_of_key == file:
                    if key not in header:
                        raise RealignError(f"{self.role} checkpoint: '{key}' is listed in the index but missing from {file}")
                    headers[key] = header[key]
        return headers

    @property
    def is_safetensors(self) -> bool:
        return self._format == "safetensors"

    def files(self) -> list[str]:
        """The weight files, relative to the directory."""
        return sorted(set(self._weight_map.values()))

    def file_of(self, key: str) -> str:
        return self._weight_map[key]

    def byte_range(self, key: str) -> tuple[int, int]:
        """[start, end) of the tensor's raw bytes in its safetensors file, from the header, so a
        tensor of the same dtype and shape can be written over it in a copy of the file."""
        data_start, header = self._raw_header(self._weight_map[key])
        start, end = header[key]["data_offsets"]
        return data_start + start, data_start + end

    @functools.lru_cache(maxsize=None)
    def _raw_header(self, file: str) -> tuple[int, dict]:
        """(offset of the data section, header JSON) of a safetensors file."""
        path = require_file(self.directory / file, f"{self.role} checkpoint file")
        try:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, RecursionError) as exc:
            raise RealignError(f"{self.role} checkpoint: '{path}' has no readable safetensors header ({exc})") from None
        return 8 + length, header

    def validate(self) -> None:
        """Read every header now, so a truncated or inconsistent checkpoint fails before any work."""
        _ = self._headers

    def _bin_shard(self, file: str) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            path = require_file(self.directory / file, f"{self.role} checkpoint file")
            state = load_state_dict(path, f"{self.role} checkpoint", mmap=True)
            self._bin_cache = (file, state)
        return self._bin_cache[1]
