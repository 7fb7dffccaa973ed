"""NLSR (Yi et al., AAAI 2025): transplant the safety-critical entries of an amplified aligned
adapter into a fine-tuned adapter, in the modules whose safety region drifted most.

Pure functions on tensors. Notation: a LoRA module has A (r x d_in) and B (d_out x r); G is the
r x r Gram sum z z^T of z = A_ref x over the response positions of calibration data.

Safety region of a factor M: with scores S = X M^T (X the inputs M sees), keep the top
q = int(sparsity * min(shape)) right singular vectors V_q of S, project M~ = V_q V_q^T M, and
mark the top n - int(n * sparsity) entries of |M~|. Only S^T S is needed:
  A: S^T S = A Sigma A^T = G;
  B: S^T S = B G B^T = Q (R G R^T) Q^T with the thin QR B = Q R, an r x r eigenproblem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ADAPTIVE, THRESHOLD, LOWEST = "adaptive", "threshold", "lowest"
SELECTIONS = (ADAPTIVE, THRESHOLD, LOWEST)
PAPER, REFERENCE = "paper", "reference"
DIRECTIONS = (PAPER, REFERENCE)
ONE_PASS, SEQUENTIAL = "one-pass", "sequential"
REGION_MODES = (ONE_PASS, SEQUENTIAL)


@dataclass(frozen=True)
class Selection:
    """Which modules to patch, given each module's masked-factor similarity."""

    rule: str = ADAPTIVE
    prune_rate: float = 0.5  # P_L: the expected fraction of modules patched (adaptive, lowest)
    epsilon: float = 0.2  # adaptive: probabilities span P_L +- epsilon
    tau: float = 0.1  # threshold: patch where similarity < tau
    direction: str = PAPER  # adaptive: paper = least similar most likely; reference = the code's reverse
    seed: int = 42


def amplify(a: torch.Tensor, b: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a module's update dW = s B A by `factor`, split evenly as sqrt(factor) on each factor
    (the reference code multiplies both factors by 1.8: factor 3.24)."""
    root = math.sqrt(factor)
    return (a.float() * root).to(a.dtype), (b.float() * root).to(b.dtype)


def kept_directions(shape: tuple[int, int], sparsity: float) -> int:
    """q = int(sparsity * min(shape)), as the reference ties the subspace size to the sparsity."""
    return int(sparsity * min(shape))


def kept_entries(numel: int, sparsity: float) -> int:
    return numel - int(numel * sparsity)


def _top_eigenvectors(symmetric: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-q eigenvectors, all eigenvalues in descending order), float64."""
    values, vectors = torch.linalg.eigh(symmetric.double())
    return vectors[:, -q:].flip(-1), values.flip(-1)


@dataclass(frozen=True)
class Projected:
    factor: torch.Tensor  # M~ = V_q V_q^T M, float64
    eigenvalues: torch.Tensor  # of S^T S restricted to the span that matters, descending

    def relative_gap(self, q: int) -> float:
        """(lambda_q - lambda_q+1) / lambda_1: near zero means the kept subspace is not determined
        by the data, and neither are M~ and its mask."""
        values = self.eigenvalues
        if q >= values.shape[0] or values[0] <= 0:
            return 1.0
        return float((values[q - 1] - values[q]) / values[0])


def project_a(a: torch.Tensor, gram: torch.Tensor, q: int) -> Projected:
    """A~ = V_q V_q^T A, V_q the top-q eigenvectors of G = S_A^T S_A (r x r)."""
    basis, values = _top_eigenvectors(gram, q)
    a64 = a.double()
    return Projected(basis @ (basis.T @ a64), values)


def project_b(b: torch.Tensor, gram: torch.Tensor, q: int) -> Projected:
    """B~ = V_q V_q^T B, V_q the top-q eigenvectors of B G B^T (d_out x d_out), found in the
    r-dimensional column space of B: B = Q R, B G B^T = Q (R G R^T) Q^T."""
    b64 = b.double()
    basis_q, r = torch.linalg.qr(b64)
    small, values = _top_eigenvectors(r @ gram.double() @ r.T, q)
    basis = basis_q @ small
    return Projected(basis @ (basis.T @ b64), values)


def top_mask(projected: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of the n - int(n * sparsity) largest |entries|; equal values go to the
    lower flat index, so the mask is deterministic."""
    flat = projected.abs().flatten()
    keep = kept_entries(flat.numel(), sparsity)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:keep]] = True
    return mask.reshape(projected.shape)


def masked_similarity(
    fine_tuned: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    masks: tuple[torch.Tensor, torch.Tensor],
) -> float | None:
    """Cosine between (B_f o M_B)(A_f o M_A) and (B_r o M_B)(A_r o M_A), from r x r products in
    float64; None when either product is zero."""
    mask_a, mask_b = masks
    a1, b1 = (t.double() * m for t, m in zip(fine_tuned, (mask_a, mask_b)))
    a2, b2 = (t.double() * m for t, m in zip(reference, (mask_a, mask_b)))
    inner = torch.sum((b1.T @ b2) * (a1 @ a2.T))  # <B1 A1, B2 A2> = tr(B1^T B2 A2 A1^T)
    norm1 = torch.sum((b1.T @ b1) * (a1 @ a1.T)).clamp_min(0)
    norm2 = torch.sum((b2.T @ b2) * (a2 @ a2.T)).clamp_min(0)
    if float(norm1) <= 0.0 or float(norm2) <= 0.0:
        return None
    return float(inner) / math.sqrt(float(norm1) * float(norm2))


def adaptive_probabilities(
    similarities: list[float], prune_rate: float, epsilon: float, direction: str
) -> list[float]:
    """p = (P_L - eps) + 2 eps n, clipped to [0, 1], with n the module's similarity rank scaled
    to [0, 1]. paper: n = 1 for the least similar module (restore the most drifted);
    reference: n = 1 for the most similar (what the reference code does). Equal similarities
    are ranked by list order (natural module order). A single module gets p = P_L."""
    count = len(similarities)
    if count == 1:
        return [min(1.0, max(0.0, prune_rate))]
    ascending = sorted(range(count), key=lambda i: (similarities[i], i))
    rank = [0] * count
    for position, index in enumerate(ascending):
        rank[index] = position
    probabilities = []
    for i in range(count):
        scaled = rank[i] / (count - 1)
        if direction == PAPER:
            scaled = 1.0 - scaled
        probabilities.append(min(1.0, max(0.0, prune_rate - epsilon + 2 * epsilon * scaled)))
    return probabilities


def select(similarities: list[float], selection: Selection) -> tuple[list[bool], list[float] | None]:
    """(patch this module?, adaptive probabilities or None) for modules in natural order."""
    if selection.rule == THRESHOLD:
        return [s < selection.tau for s in similarities], None
    if selection.rule == LOWEST:
        count = round(selection.prune_rate * len(similarities))
        ascending = sorted(range(len(similarities)), key=lambda i: (similarities[i], i))
        chosen = set(ascending[:count])
        return [i in chosen for i in range(len(similarities))], None
    probabilities = adaptive_probabilities(similarities, selection.prune_rate, selection.epsilon, selection.direction)
    generator = torch.Generator(device="cpu").manual_seed(selection.seed)
    draws = torch.bernoulli(torch.tensor(probabilities, dtype=torch.float64), generator=generator)
    return [bool(d) for d in draws], probabilities


def transplant(fine_tuned: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fine-tuned factor with its masked entries replaced by the reference's, in its dtype."""
    return torch.where(mask.to(fine_tuned.device), reference.to(fine_tuned.device, fine_tuned.dtype), fine_tuned)
