"""Content identity for caches: digests of JSON-able keys and of directory trees."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

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
