"""Safe LoRA (Hsu et al., NeurIPS 2024) as pure tensor functions.

Per LoRA module with alignment matrix V = W_aligned - W_base:
  approx (paper and reference):  C = V V^T / ||V||_F   (not idempotent; kept as published)
  exact (realign's extension):   C = U_k U_k^T, U_k the top-k left singular vectors of V
similarity = cos(vec(dW), vec(C dW)) with dW = s B A (s cancels), and a selected module gets
B' = C B. Neither C nor dW is ever formed; see realign.linalg. V itself comes from
realign.methods.alignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...io.names import natural_key
from ...linalg import Matrix, cosine_from_parts, difference_gram_apply, gram_apply, lowrank_cosine

APPROX = "approx"
EXACT = "exact"


@dataclass(frozen=True)
class Settings:
    threshold: float | None = 0.5
    top_k: int | None = None
    projection: str = APPROX
    rank: int | None = None

    @property
    def selection(self) -> str:
        return "top_k" if self.top_k is not None else "threshold"


@dataclass
class ModuleScore:
    name: str
    similarity: float | None  # None: undefined, the module is skipped
    projected_b: torch.Tensor | None  # C B, float32, kept until selection decides
    alignment_norm: float
    skip_reason: str | None = None


def alignment_matrix(w_aligned: torch.Tensor, w_base: torch.Tensor) -> torch.Tensor:
    """V = W_aligned - W_base in float32; both operands are upcast before subtracting, so a
    small alignment delta between bf16 weights is not rounded away."""
    return w_aligned.to(torch.float32) - w_base.to(torch.float32)


def approx_projection(v: Matrix, b: torch.Tensor, norm: float) -> torch.Tensor:
    """C B = V (V^T B) / ||V||_F in float32, for ||V||_F = norm > 0."""
    return gram_apply(v, b.to(torch.float32)) / norm


def approx_projection_of_difference(
    w_aligned: torch.Tensor, w_base: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor | None, float]:
    """(C B, ||V||_F) for V = W_aligned - W_base, streamed in float32 blocks so V is never
    materialised; C B is None when V = 0. The norm is NaN or Inf when an operand is."""
    projected, norm_sq = difference_gram_apply(w_aligned, w_base, b)
    norm = math.sqrt(norm_sq) if norm_sq >= 0 else float("nan")
    if norm == 0.0:
        return None, 0.0
    return projected.div_(norm), norm


def exact_projection(basis: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """U_k U_k^T B, computed in float64 and returned as float32."""
    u = basis.to(b.device, torch.float64)
    return (u @ (u.T @ b.double())).to(torch.float32)


def dense_projection(v: torch.Tensor, dw: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """C dW = V V^T dW / ||V||_F for a batch (b, m, n) of dense float32 matrices, through the
    cheaper association: (V V^T) dW when m <= n, V (V^T dW) otherwise; 2 min(m, n) m n each."""
    m, n = v.shape[-2:]
    projected = (v @ v.mT) @ dw if m <= n else v @ (v.mT @ dw)
    return projected.div_(norms.to(projected.dtype)[:, None, None])


def basis_projection(basis: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """U U^T dW for a batch of orthonormal bases (b, m, k), float32."""
    u = basis.to(dw.device, torch.float32)
    return u @ (u.mT @ dw)


def dense_cosines(dw: torch.Tensor, projected: torch.Tensor) -> list[float | None]:
    """cos(vec(dW), vec(C dW)) for each matrix of a batch: row sums in float32, the rest in
    float64 (a float32 sum over millions of entries drifts by 1e-5 and more)."""
    inner = (dw * projected).sum(-1).double().sum(-1)
    norm_dw = dw.square().sum(-1).double().sum(-1)
    norm_p = projected.square().sum(-1).double().sum(-1)
    return [cosine_from_parts(float(i), float(a), float(b)) for i, a, b in zip(inner, norm_dw, norm_p)]


def score_module(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    projected: torch.Tensor | None,
    alignment_norm: float,
) -> ModuleScore:
    """Similarity of one module's update B A to its projection (C B) A.

    `projected` is None when the module has no alignment direction (V = 0).
    """
    if projected is None:
        return ModuleScore(name, None, None, alignment_norm, "no alignment change on this module (V = 0)")
    inner, norm_update, norm_projected = lowrank_cosine(b, projected, a)
    similarity = cosine_from_parts(inner, norm_update, norm_projected)
    if similarity is None:
        return ModuleScore(name, None, None, alignment_norm, "the adapter update is zero (B A = 0)")
    return ModuleScore(name, similarity, projected, alignment_norm)


def select(scores: list[ModuleScore], settings: Settings) -> set[str]:
    """Names of the modules to project: similarity <= threshold, or exactly the top_k least
    similar with ties broken by natural name order."""
    scored = [s for s in scores if s.similarity is not None]
    if settings.top_k is not None:
        ranked = sorted(scored, key=lambda s: (s.similarity, natural_key(s.name)))
        return {s.name for s in ranked[: settings.top_k]}
    return {s.name for s in scored if s.similarity <= settings.threshold}


__all__ = [
    "APPROX",
    "EXACT",
    "ModuleScore",
    "Settings",
    "alignment_matrix",
    "approx_projection",
    "approx_projection_of_difference",
    "basis_projection",
    "dense_cosines",
    "dense_projection",
    "exact_projection",
    "score_module",
    "select",
]
