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


def sum_of_squares(t: torch.Tensor) -> float:
    """||t||_F^2 to float64 accuracy at float32 speed: row norms in float32, summed in float64.
    (A float32 norm or dot over millions of entries drifts by 1e-5 to 1e-3 on CPU.)"""
    if t.dim() < 2:
        t = t.reshape(1, -1)
    return float(torch.linalg.vector_norm(t.float(), dim=-1).double().square().sum())


def frobenius_norm(v: Matrix) -> float:
    if isinstance(v, LowRank):
        left, right = v.left.double(), v.right.double()
        # ||L R||_F^2 = tr(L^T L R R^T), all k x k
        return float(torch.sum((left.T @ left) * (right @ right.T)).clamp_min(0).sqrt())
    return sum_of_squares(v) ** 0.5


def gram_apply(v: Matrix, b: torch.Tensor) -> torch.Tensor:
    """V V^T B without forming V V^T (nor, for a low-rank V and a wide B, anything wider than B)."""
    if isinstance(v, LowRank):
        return v.left @ ((v.right @ v.right.T) @ (v.left.T @ b))
    return v @ (b.T @ v).T  # B^T V walks V row-major; V^T B would stride across it


def difference_gram_apply(
    w_aligned: torch.Tensor, w_base: torch.Tensor, b: torch.Tensor, block_bytes: int = 1 << 22
) -> tuple[torch.Tensor, float]:
    """(V V^T B, ||V||_F^2) for V = w_aligned - w_base, without materialising V.

    Two passes over row blocks: the first accumulates V^T B and the norm, the second applies V
    again. Each block is upcast to float32 before subtracting, in small reused buffers, so the
    cost is two streaming reads of the stored weights (often bf16) and no allocation of V.
    (Forming V once per module instead was measured 2x slower and 2.5x larger on 7B shapes:
    docs/benchmarks.md.)
    """
    d_out, d_in = w_aligned.shape
    rows = max(1, block_bytes // (4 * d_in))
    b32 = b.to(torch.float32)
    buf_a = torch.empty(min(rows, d_out), d_in, dtype=torch.float32, device=b.device)
    buf_b = torch.empty_like(buf_a)

    def block(start: int) -> torch.Tensor:
        stop = min(start + rows, d_out)
        va, vb = buf_a[: stop - start], buf_b[: stop - start]
        va.copy_(w_aligned[start:stop])
        vb.copy_(w_base[start:stop])
        return va.sub_(vb)

    vt_b = torch.zeros(b32.shape[1], d_in, dtype=torch.float32, device=b.device)  # (V^T B)^T
    norm_sq = 0.0
    for start in range(0, d_out, rows):
        v = block(start)
        norm_sq += sum_of_squares(v)
        vt_b.addmm_(b32[start : start + v.shape[0]].T, v)
    projected = torch.empty_like(b32)
    for start in range(0, d_out, rows):
        v = block(start)
        torch.mm(v, vt_b.T, out=projected[start : start + v.shape[0]])
    return projected, norm_sq


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


def randomized_top_left_singular_vectors(
    a: torch.Tensor, k: int, oversample: int | None = None, iterations: int = 4, seed: int = 0
) -> torch.Tensor:
    """Top-k left singular vectors of each matrix of a batch (b, m, n) by randomized subspace
    iteration (Halko, Martinsson and Tropp 2011, alg. 4.4): a seeded Gaussian sketch of k + p
    columns, `iterations` power steps re-orthonormalised by QR, then an exact SVD of the small
    (k + p) x n projection. O(m n (k + p) iterations) instead of min(m, n)^3; the result is a
    true orthonormal basis, so ||A - U U^T A|| can be measured exactly afterwards. Falls back to
    the exact decomposition when the sketch would not be smaller than the matrix."""
    m, n = a.shape[-2:]
    width = k + (oversample if oversample is not None else max(k, 10))
    if width >= min(m, n):
        return top_left_singular_vectors(a, k)[0].to(a.dtype)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[0], n, width, generator=gen, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(iterations):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q).Q).Q
    small = (q.mT @ a).double()
    u_small = torch.linalg.svd(small, full_matrices=False).U[..., :k]
    return q @ u_small.to(a.dtype)


def truncated_factors(stacked: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, list[float | None]]:
    """A rank-`rank` factorisation B A of each matrix of a batch (b, m, n), from its top singular
    vectors (randomized subspace iteration, seeded): (A (b, k, n), B (b, m, k), each matrix's
    relative Frobenius error ||M - B A|| / ||M||, measured; None for a zero matrix)."""
    basis = randomized_top_left_singular_vectors(stacked, rank)
    right = basis.mT @ stacked
    residual = stacked - basis @ right
    errors: list[float | None] = []
    for i in range(stacked.shape[0]):
        total = float(stacked[i].square().sum(-1).double().sum())
        errors.append(None if total == 0 else (float(residual[i].square().sum(-1).double().sum()) / total) ** 0.5)
    return right, basis, errors


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
