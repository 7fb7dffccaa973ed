"""RESTA (Bhardwaj et al., ACL 2024: "Language Models are Homer Simpson! Safety Re-Alignment of
Fine-tuned Language Models through Task Arithmetic") as pure tensor functions: T' = a T + b S,
with S the safety vector, optionally sparsified by DARE first."""

from __future__ import annotations

import torch


def dare(matrix: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024): drop each entry with probability `p` and rescale the kept
    ones by 1 / (1 - p), so the expected matrix is unchanged. float32."""
    keep = torch.rand(matrix.shape, generator=generator) >= p
    return torch.where(keep, matrix.float() / (1.0 - p), torch.zeros((), dtype=torch.float32))


def module_seed(seed: int, index: int) -> int:
    """A module's own seed, so its DARE mask does not depend on which modules ran before it."""
    return (seed * 1_000_003 + index) % (2**63)
