"""Content identity: digests of JSON-able keys, of directory trees (caches), and of the tensors a
result was computed from (so a masks file or a safety module can be matched to its model)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from .names import natural_key

# bookkeeping that the caches write next to what they cache; not part of a model's identity
BOOKKEEPING = frozenset({"stage.json", "realign_report.json"})


def digest(*parts) -> str:
    """12 hex digits of SHA-256 over a canonical JSON encoding of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def tree_id(path: str | None) -> tuple:
    """Relative names and SHA-256 of the files of a file or directory (bookkeeping excluded), so
    a copied or moved tree keeps its identity and any changed byte changes it."""
    if path is None:
        return ()
    root = Path(path)
    if root.is_file():
        return ((root.name, _sha256(root)),)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in BOOKKEEPING and "__pycache__" not in p.parts]
    return tuple((str(p.relative_to(root)), _sha256(p)) for p in files)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            sha.update(chunk)
    return sha.hexdigest()


def factors_digest(tensors: dict[str, torch.Tensor], modules) -> str:
    """SHA-256 of a set of LoRA factors by module name, dtype, shape and bytes: what masks are
    computed from, so a masks file can be matched to its reference adapter."""
    sha = hashlib.sha256()
    for module in sorted(modules, key=lambda m: natural_key(m.name)):
        for key, label in ((module.key_a, "A"), (module.key_b, "B")):
            tensor = tensors[key].detach().cpu().contiguous()
            sha.update(f"{module.name}.{label}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def weights_digest(targets) -> str:
    """SHA-256 of the target weights (name, shape, float32 bytes): which model a module file or
    an initialisation belongs to."""
    sha = hashlib.sha256()
    for target in targets:
        w = target.weight().cpu().contiguous()
        sha.update(f"{target.path}:{tuple(w.shape)};".encode())
        sha.update(w.numpy().tobytes())
    return sha.hexdigest()

