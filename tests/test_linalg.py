"""Low-rank kernels against dense float64 formulas on random shapes."""

import pytest
import torch

from realign.linalg import (
    LowRank,
    cosine_from_parts,
    frobenius_norm,
    gram_apply,
    lowrank_cosine,
    lowrank_top_left_singular_vectors,
    rank_is_defined,
    top_left_singular_vectors,
)
from realign.methods.safelora import math as method

SHAPES = [(16, 16, 2), (48, 16, 4), (16, 48, 8), (96, 40, 1), (33, 70, 5)]


def rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.mark.parametrize("d_out,d_in,r", SHAPES)
def test_projection_and_cosine_match_dense(d_out, d_in, r):
    gen = torch.Generator().manual_seed(d_out * 1000 + d_in + r)
    v = torch.randn(d_out, d_in, generator=gen)
    a = torch.randn(r, d_in, generator=gen)
    b = torch.randn(d_out, r, generator=gen)
    v64, a64, b64 = v.double(), a.double(), b.double()
    c = v64 @ v64.T / torch.linalg.norm(v64)
    dw = b64 @ a64
    want_cos = torch.dot(dw.flatten(), (c @ dw).flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(c @ dw))

    norm = frobenius_norm(v)
    p = method.approx_projection(v, b, norm)
    assert rel(p, c @ b64) < 1e-6
    score = method.score_module("m", a, b, p, norm)
    assert score.similarity == pytest.approx(float(want_cos), rel=1e-6)


@pytest.mark.parametrize("d_out,d_in,r", SHAPES)
def test_lowrank_matrix_matches_its_dense_product(d_out, d_in, r):
    gen = torch.Generator().manual_seed(7 + d_out)
    left, right = torch.randn(d_out, 3, generator=gen), torch.randn(3, d_in, generator=gen)
    b = torch.randn(d_out, r, generator=gen)
    dense = left @ right
    assert frobenius_norm(LowRank(left, right)) == pytest.approx(frobenius_norm(dense), rel=1e-6)
    assert rel(gram_apply(LowRank(left, right), b), gram_apply(dense, b)) < 1e-5


@pytest.mark.parametrize("batch,m,n,k", [(1, 20, 20, 3), (3, 12, 30, 4), (2, 30, 12, 5), (4, 7, 9, 7)])
def test_top_left_singular_vectors_span_the_svd_subspace(batch, m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    v = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    u, sigma = top_left_singular_vectors(v.float(), k)
    assert u.shape == (batch, m, k)
    for i in range(batch):
        ref_u, ref_s, _ = torch.linalg.svd(v[i].float().double(), full_matrices=False)
        want = ref_u[:, :k] @ ref_u[:, :k].T
        got = u[i] @ u[i].T
        assert rel(got, want) < 1e-8
        assert torch.allclose(u[i].T @ u[i], torch.eye(k, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(sigma[i][: ref_s.numel()], ref_s, rtol=1e-8)


def test_lowrank_singular_vectors_and_rank_check():
    gen = torch.Generator().manual_seed(3)
    left, right = torch.randn(20, 4, generator=gen), torch.randn(4, 30, generator=gen)
    u, sigma = lowrank_top_left_singular_vectors(LowRank(left, right), 2)
    ref = torch.linalg.svd(left.double() @ right.double(), full_matrices=False)[0][:, :2]
    assert rel(u @ u.T, ref @ ref.T) < 1e-8
    assert rank_is_defined(sigma, 4)
    assert not rank_is_defined(sigma, 5)
    _, sigma_dense = top_left_singular_vectors((left @ right).unsqueeze(0), 2)
    assert rank_is_defined(sigma_dense[0], 4) and not rank_is_defined(sigma_dense[0], 5)


def test_cosine_parts_edge_cases():
    assert cosine_from_parts(0.0, 0.0, 1.0) is None  # zero update: undefined
    assert cosine_from_parts(0.0, 1.0, 0.0) == 0.0  # update orthogonal to the alignment directions
    assert cosine_from_parts(2.0, 4.0, 1.0) == pytest.approx(1.0)
    inner, nb, npj = lowrank_cosine(torch.ones(3, 1), torch.ones(3, 1), torch.ones(1, 2))
    assert cosine_from_parts(inner, nb, npj) == pytest.approx(1.0)


def test_alignment_matrix_upcasts_before_subtracting():
    base = torch.tensor([[1.0, 256.0]], dtype=torch.bfloat16)
    aligned = torch.tensor([[1.0078125, 258.0]], dtype=torch.bfloat16)
    v = method.alignment_matrix(aligned, base)
    assert v.dtype == torch.float32
    assert v.tolist() == [[0.0078125, 2.0]]
    assert base.tolist() == [[1.0, 256.0]]  # inputs untouched


def test_selection_top_k_ties_by_natural_name_order():
    scores = [
        method.ModuleScore("layers.10.q", 0.1, None, 1.0),
        method.ModuleScore("layers.2.q", 0.1, None, 1.0),
        method.ModuleScore("layers.1.q", 0.3, None, 1.0),
        method.ModuleScore("layers.3.q", None, None, 0.0, "V = 0"),
    ]
    assert method.select(scores, method.Settings(threshold=None, top_k=1)) == {"layers.2.q"}
    assert method.select(scores, method.Settings(threshold=None, top_k=2)) == {"layers.2.q", "layers.10.q"}
    assert method.select(scores, method.Settings(threshold=0.3)) == {"layers.2.q", "layers.10.q", "layers.1.q"}
    assert method.select(scores, method.Settings(threshold=0.09)) == set()


@pytest.mark.parametrize("d_out,d_in,r,dtype,transposed", [
    (64, 48, 4, torch.bfloat16, False),
    (37, 80, 3, torch.float16, False),
    (50, 50, 8, torch.float32, True),
    (300, 20, 2, torch.bfloat16, True),
])
def test_streamed_difference_projection_matches_dense(d_out, d_in, r, dtype, transposed):
    gen = torch.Generator().manual_seed(d_out + d_in)
    shape = (d_in, d_out) if transposed else (d_out, d_in)
    w_base = torch.randn(shape, generator=gen).to(dtype)
    w_aligned = (w_base.float() + 1e-2 * torch.randn(shape, generator=gen)).to(dtype)
    if transposed:  # Conv1D weights arrive as transposed views
        w_base, w_aligned = w_base.T, w_aligned.T
    b = torch.randn(d_out, r, generator=gen)
    v = w_aligned.double() - w_base.double()
    from realign.linalg import difference_gram_apply

    got, norm_sq = difference_gram_apply(w_aligned, w_base, b, block_bytes=4 * d_in * 7)  # several blocks
    assert rel(got, v @ (v.T @ b.double())) < 1e-5
    assert norm_sq == pytest.approx(float((v * v).sum()), rel=1e-6)
    projected, norm = method.approx_projection_of_difference(w_aligned, w_base, b)
    assert rel(projected, v @ (v.T @ b.double()) / torch.linalg.norm(v)) < 1e-5
    assert method.approx_projection_of_difference(w_base, w_base, b) == (None, 0.0)


def test_randomized_basis_is_near_optimal():
    from realign.linalg import randomized_top_left_singular_vectors

    gen = torch.Generator().manual_seed(3)
    for decay in (0.7, 0.98):  # a clear spectrum, and an almost flat one
        u = torch.linalg.qr(torch.randn(3, 120, 90, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(3, 160, 90, generator=gen, dtype=torch.float64)).Q
        a = (u * decay ** torch.arange(90, dtype=torch.float64)) @ v.mT
        basis = randomized_top_left_singular_vectors(a.float(), 8).double()
        assert torch.allclose(basis.mT @ basis, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-5)
        error = torch.linalg.matrix_norm(a - basis @ (basis.mT @ a))
        optimal = torch.linalg.svdvals(a)[:, 8:].norm(dim=-1)
        assert torch.all(error <= optimal * 1.01 + 1e-6), (decay, error, optimal)
        # deterministic for the seed
        assert torch.equal(basis.float(), randomized_top_left_singular_vectors(a.float(), 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """all_finite (two reductions) against the isfinite mask it replaces: NaN, +Inf and -Inf at the
    ends, the middle and random places of contiguous and transposed tensors of sizes around the
    vector widths; empty tensors and integer tensors are finite."""
    from realign.errors import all_finite

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 8, 9, 16, 17, 33, 64, 65, 1000, 4099):
        for value in (float("nan"), float("inf"), float("-inf"), None):
            positions = {0, n - 1, n // 2, int(torch.randint(0, n, (1,), generator=g))}
            for position in positions:
                flat = torch.randn(n, generator=g).to(dtype)
                wide = torch.randn(n, 3, generator=g).to(dtype).T
                if value is not None:
                    flat[position] = value
                    wide[1, position] = value
                for tensor in (flat, wide):
                    assert all_finite(tensor) == bool(torch.isfinite(tensor).all()) == (value is None)
    assert all_finite(torch.empty(0, 4, dtype=dtype))
    assert all_finite(torch.arange(5))


def test_buffers_reuse_one_storage_per_slot_and_dtype():
    from realign.buffers import Buffers

    buffers = Buffers()
    first = buffers.take("a", (4, 6), torch.float32)
    again = buffers.take("a", (3, 2), torch.float32)
    assert again.data_ptr() == first.data_ptr() and again.shape == (3, 2) and again.is_contiguous()
    other = buffers.take("b", (4, 6), torch.float32)
    half = buffers.take("a", (4, 6), torch.bfloat16)
    assert len({first.data_ptr(), other.data_ptr(), half.data_ptr()}) == 3
    grown = buffers.take("a", (10, 10), torch.float32)
    assert grown.shape == (10, 10) and grown.numel() == 100
    assert buffers.take("a", (4, 6), torch.float32).data_ptr() == grown.data_ptr()
