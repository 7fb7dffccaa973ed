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

from ..linalg import top_left_singular_vectors


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


def task_init(
    weight: torch.Tensor, safety_basis: torch.Tensor, task_basis: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A0, B0, W_res) in float64: PiSSA factors of W steered into the task subspace, and the
    residual weight that keeps the model unchanged at init for any scaling s."""
    w = weight.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    a0 = root.unsqueeze(-1) * vh[:rank]
    v_t = task_basis.double()
    b0 = v_t @ (v_t.T @ (u[:, :rank] * root))
    w_res = w - scaling * project_out(safety_basis.double(), b0) @ a0
    return a0, b0, w_res


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
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    root = s.sqrt()
    return root.unsqueeze(-1) * (vh @ q_right.T), (q_left @ u) * root
