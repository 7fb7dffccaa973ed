"""Low-rank kernels and batched decompositions, the same code on CPU and GPU.

Safe LoRA never needs a d x d matrix: with C = V V^T / ||V||_F, C B = V (V^T B) / ||V||_F,
and the cosine between dW = B A and C dW = P A reduces to r x r Gram matrices:
<BA, PA> = tr(B^T P G), ||BA||^2 = tr(B^T B G), ||PA||^2 = tr(P^T P G) with G = A A^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """A matrix held as left @ right: left (m x k), right (k x n)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LowRank":
        return LowRank(self.left.to(device, dtype), self.right.to(device, dtype))


Matrix = torch.Tensor | LowRank


def frobenius_norm(v: Matrix) -> float:
    if isinstance(v, LowRank):
        left, right = v.left.double(), v.right.double()
        # ||L R||_F^2 = tr(L^T L R R^T), all k x k
        return float(torch.sum((left.T @ left) * (right @ right.T)).clamp_min(0).sqrt())
    return float(torch.linalg.vector_norm(v, dtype=torch.float64))


def gram_apply(v: Matrix, b: torch.Tensor) -> torch.Tensor:
    """V V^T B without forming V V^T."""
    if isinstance(v, LowRank):
        return v.left @ (v.right @ (v.right.T @ (v.left.T @ b)))
    return v @ (v.T @ b)


def lowrank_cosine(b: torch.Tensor, p: torch.Tensor, a: torch.Tensor) -> tuple[float, float, float]:
    """(<BA, PA>, ||BA||_F^2, ||PA||_F^2) from r x r Grams, accumulated in float64."""
    b64, p64, a64 = b.double(), p.double(), a.double()
    g = a64 @ a64.T
    inner = torch.sum((b64.T @ p64) * g)
    norm_b = torch.sum((b64.T @ b64) * g)
    norm_p = torch.sum((p64.T @ p64) * g)
    return float(inner), float(norm_b.clamp_min(0)), float(norm_p.clamp_min(0))


def cosine_from_parts(inner: float, norm_sq_a: float, norm_sq_b: float) -> float | None:
    """Cosine from an inner product and squared norms; None when a vector is zero."""
    if norm_sq_a <= 0.0:
        return None
    if norm_sq_b <= 0.0:
        return 0.0
    return inner / (norm_sq_a * norm_sq_b) ** 0.5


def top_left_singular_vectors(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors and all singular values of each matrix in a batch (b, m, n).

    Returns U (b, m, k) and sigma (b, min(m, n)) in descending order, float64. Computed from the
    eigendecomposition of the smaller Gram matrix in float64: min(m, n)^3 per matrix instead of
    a full SVD, and the squared condition number stays far inside float64's range for the
    leading directions this is used for.
    """
    v64 = v.double()
    m, n = v64.shape[-2:]
    gram = v64 @ v64.mT if m <= n else v64.mT @ v64
    vals, vecs = torch.linalg.eigh(gram)
    sigma = vals.flip(-1).clamp_min(0).sqrt()
    top = vecs[..., -k:].flip(-1)
    if m <= n:
        return top, sigma
    left = (v64 @ top) / sigma[..., :k].clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    # one QR pass restores the orthonormality that the division by sigma loses to rounding
    q, r = torch.linalg.qr(left)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2), sigma


def lowrank_top_left_singular_vectors(v: LowRank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors and the singular values of L R, via a thin QR of L."""
    q, r = torch.linalg.qr(v.left.double())
    u_small, sigma, _ = torch.linalg.svd(r @ v.right.double(), full_matrices=False)
    return q @ u_small[:, :k], sigma


def rank_is_defined(sigma: torch.Tensor, k: int) -> bool:
    """A rank-k projector is well defined when the k-th singular value is clearly above noise."""
    if k > sigma.shape[-1]:
        return False
    return bool(sigma[..., k - 1] > sigma[..., 0] * 1e-6)
