"""Module names: PEFT prefixes, natural ordering, matching adapter modules to checkpoint keys."""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import RealignError

PEFT_PREFIX = "base_model.model."

# Checkpoint keys of input embeddings that a tied `lm_head` shares its weight with.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight")


def strip_peft_prefix(path: str) -> str:
    return path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)


def layer_prefix(path: str) -> str:
    """The enclosing numbered block of a module path ('model.layers.3' of
    'model.layers.3.mlp.up_proj'); the path itself when it is in no numbered block (lm_head)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path


def in_forward_order(prefixes: Iterable[str]) -> list[str]:
    """Numbered blocks in order, then modules outside them (an lm_head runs last)."""
    return sorted(prefixes, key=lambda p: (not any(part.isdigit() for part in p.split(".")), natural_key(p)))


def _dotted_suffix(longer: str, shorter: str) -> bool:
    return longer == shorter or longer.endswith("." + shorter)


def find_module(path: str, modules: Iterable[str], what: str) -> str | None:
    """The one module path in `modules` that names the same module as `path`, or None.

    Adapters may be saved from the task model (`model.layers.0...`) or from the inner model
    (`layers.0...`), and checkpoints may or may not carry the outer prefix (`transformer.h.0`
    vs `h.0` in old GPT-2 files), so two paths match when one dotted path is a suffix of the
    other. An exact match wins; several suffix matches are an error, never a guess.
    """
    path = strip_peft_prefix(path)
    modules = modules if isinstance(modules, (set, frozenset, dict)) else set(modules)
    if path in modules:
        return path
    candidates = [m for m in modules if _dotted_suffix(m, path) or _dotted_suffix(path, m)]
    if len(candidates) > 1:
        shown = ", ".join(natural_sorted(candidates)[:3])
        raise RealignError(f"adapter module '{path}' matches several modules in the {what} ({shown}); cannot tell which one is meant")
    return candidates[0] if candidates else None


class WeightResolver:
    """Maps a module path (as PEFT names it) to the key of its weight in one checkpoint."""

    def __init__(self, keys: Iterable[str], config: dict | None = None, role: str = "checkpoint"):
        self.role = role
        self.config = config or {}
        self._modules = {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
        self._keys = set(keys)

    def weight_key(self, module_path: str) -> str:
        path = strip_peft_prefix(module_path)
        found = find_module(path, self._modules, f"{self.role} checkpoint")
        if found is not None:
            return found + ".weight"
        tied = self._tied_embedding(path)
        if tied is not None:
            return tied
        raise RealignError(f"module '{path}' has no weight in the {self.role} checkpoint")

    def _tied_embedding(self, path: str) -> str | None:
        # A checkpoint stores no lm_head weight exactly when the head is tied to the embeddings.
        if path.split(".")[-1] != "lm_head" or self.config.get("tie_word_embeddings") is False:
            return None
        found = [k for k in self._keys if any(_dotted_suffix(k, s) for s in _EMBEDDING_SUFFIXES)]
        return found[0] if len(found) == 1 else None
