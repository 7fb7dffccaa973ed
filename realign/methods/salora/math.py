"""SaLoRA (Li et al., ICLR 2025): a fixed safety module keeps LoRA updates out of the aligned
model's safety subspace, and a task-specific initialisation starts them where the task lives.

Pure functions on tensors. For a target module W (d_out x d_in) of the aligned model:
  safety subspace  V_s = top r_s eigenvectors of W Sigma W^T, Sigma = sum x x^T over the module's
                   inputs on the response tokens of safety data (= right singular vectors of the
                   output features X W^T); the module is C = I - V_s V_s^T, applied on the output
                   side and never formed.
  task init        V_t from task data the same way; U S V^T = top-r SVD of W (PiSSA);
                   B0 = V_t V_t^T U S^1/2, A0 = S^1/2 V^T, W_res = W - s C B0 A0.
  training         h = W_res x + s C B A x, A and B trained, C frozen.
  export           W + s C (B A - B0 A0) = W + s [C B, -C B0] [A; A0]: a rank-2r LoRA on W.
"""

from __future__ import annotations

import torch

from ...linalg import top_left_singular_vectors


def output_basis_from_input_gram(weight: torch.Tensor, sigma: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenvectors of W Sigma W^T (batched over leading dims) and its eigenvalues,
    float64. Computed as the left singular vectors of W L with Sigma = L L^T, so the cost is
    set by min(d_out, d_in), not by d_out."""
    values, vectors = torch.linalg.eigh(sigma.double())
    root = vectors * values.clamp_min(0).sqrt().unsqueeze(-2)  # L = Q Lambda^1/2
    basis, singular = top_left_singular_vectors(weight.double() @ root, rank)
    return basis, singular.square()


def output_basis_from_output_gram(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenvectors of an output Gram Y^T Y = W Sigma W^T accumulated directly."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors[..., -rank:].flip(-1), values.flip(-1)


def project_out(basis: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C y = y - V (V^T y) along the last-but-one axis (y: d_out x k)."""
    return y - basis @ (basis.mT @ y)


def project_out_rows(basis: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """C applied to row vectors (..., d_out): what the forward pass needs."""
    return features - (features @ basis) @ basis.mT


def task_factors(weight: torch.Tensor, task_basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) in float64: PiSSA factors of W, B0 steered into the task subspace V_t. They do
    not depend on the safety module, so one task pass serves every r_s.

    With W = U S V^T: A0 = S_r^1/2 V_r^T and B0 = V_t V_t^T U_r S_r^1/2 = V_t V_t^T W V_r S_r^-1/2,
    so only the top-r right singular vectors are needed: from an eigendecomposition of the
    smaller Gram of W (min(d_out, d_in)^3), not a full SVD (24 s of a 128 s init on SmolLM2)."""
    w = weight.double()
    right, sigma = top_left_singular_vectors(w.mT, rank)  # left vectors of W^T = right vectors of W
    # below ~1e-8 of the largest, a Gram's singular values are rounding noise (an exact SVD says
    # 1e-16): treat them as the zeros they are, so a rank-deficient W gets zero rows, not noise
    values = sigma[..., :rank]
    keep = values > 1e-7 * values[..., :1]
    values = torch.where(keep, values, torch.zeros_like(values))
    inverse_root = torch.where(keep, values.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(values))
    a0 = values.sqrt().unsqueeze(-1) * right.mT
    v_t = task_basis.double()
    return a0, v_t @ (v_t.mT @ ((w @ right) * inverse_root.unsqueeze(-2)))


def residual_weight(weight: torch.Tensor, safety_basis: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_res = W - s C B0 A0 in float64: the model W_res + s C B0 A0 is W at init, for any s."""
    return weight.double() - scaling * project_out(safety_basis.double(), b0.double()) @ a0.double()


def fold_for_export(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, safety_basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A'', B'') with B'' A'' = C (B A - B0 A0), rank 2r, re-factored in float64 so that the
    large, nearly cancelling B0 A0 part does not swamp the learned delta in the stored factors:
    thin QR of both sides and an SVD of the 2r x 2r core; singular values split evenly."""
    c = safety_basis.double()
    left = torch.cat([project_out(c, b.double()), -project_out(c, b0.double())], dim=1)
    right = torch.cat([a.double(), a0.double()], dim=0)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    # thin: when 2r exceeds d_out or d_in the core is not square, and the fold has rank min(2r, d_out, d_in)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    root = s.sqrt()
    return root.unsqueeze(-1) * (vh @ q_right.T), (q_left @ u) * root
