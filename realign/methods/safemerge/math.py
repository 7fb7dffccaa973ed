"""SafeMERGE (Djuhera et al., 2025: "SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large
Language Models via Selective Layer-Wise Model Merging") as a pure rule: a module whose update
strays from the safety direction (Safe LoRA's similarity below tau) is merged with the safety
delta, T' = w_t T + w_s S; every other module keeps T."""

from __future__ import annotations

DEFAULT_TAU = 0.35  # the paper's threshold
DEFAULT_TASK_WEIGHT = 0.8  # the paper's merge weights
DEFAULT_SAFETY_WEIGHT = 0.2


def merges(similarity: float | None, tau: float) -> bool:
    """Merge this module? Strictly below tau; an undefined similarity (S = 0 or T = 0) never."""
    return similarity is not None and similarity < tau
