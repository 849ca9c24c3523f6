import math

import pytest
import torch

from laser_export.lowrank import LowRankLinear, compute_svd, factorised_saves_bytes, rank_for


@pytest.mark.parametrize(
    "rho, shape, k",
    [
        (0.01, (4096, 16384), 40),  # the paper's GPT-J fc_in at rho=0.01 keeps 40
        (0.3, (10, 20), 3),  # 0.3*10 is 2.9999999999999996 in binary floating point
        (0.05, (1536, 576), 28),
        (0.001, (64, 64), 1),  # never below 1
        (1.0, (64, 48), 48),
        (0.99, (100, 7), 6),
    ],
)
def test_rank_floor_semantics(rho, shape, k):
    assert rank_for(rho, shape) == k


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.01])
def test_rank_rejects_rho_outside_unit_interval(rho):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rank_for(rho, (10, 10))


def _spectrum_matrix(m=96, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.logspace(1, -2, min(m, n))
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


@pytest.mark.parametrize("svd_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 31, 63])
def test_truncation_is_eckart_young_optimal(svd_dtype, k):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    svd = compute_svd(w, dtype=svd_dtype)
    wk = svd.reconstruct(k)
    err = float((w.double() - wk.double()).norm())
    s = torch.linalg.svdvals(w.double())
    optimum = math.sqrt(float((s[k:] ** 2).sum()))
    assert err == pytest.approx(optimum, rel=1e-5)
    assert svd.optimal_error(k) == pytest.approx(optimum, rel=1e-5)
    left, right = svd.factors(k)
    assert left.shape == (96, k) and right.shape == (k, 64)
    torch.testing.assert_close(left @ right, wk, rtol=1e-5, atol=1e-5)


def test_svd_upcasts_half_precision_and_is_deterministic():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, b = compute_svd(w), compute_svd(w)
    assert a.S.dtype == torch.float32
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


def test_randomized_svd_is_seeded_and_near_optimal():
    w = _spectrum_matrix()
    a = compute_svd(w, method="randomized", rank=8, seed=1)
    b = compute_svd(w, method="randomized", rank=8, seed=1)
    assert torch.equal(a.S, b.S)
    assert a.S.numel() == 8 and not a.exact and a.optimal_error(8) is None
    exact = compute_svd(w, dtype=torch.float64)
    err_r = float((w - a.reconstruct(8)).norm())
    err_e = float((w.double() - exact.reconstruct(8)).norm())
    assert err_r <= err_e * 1.01
    with pytest.raises(ValueError, match="holds 8 components"):
        a.reconstruct(9)


def test_lowrank_linear_matches_dense_rank_k():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True)
    svd = compute_svd(lin.weight)
    left, right = svd.factors(10)
    mod = LowRankLinear.from_factors(left, right, lin.bias.detach(), torch.float32)
    x = torch.randn(5, 64)
    dense = x @ svd.reconstruct(10).T + lin.bias
    torch.testing.assert_close(mod(x), dense, rtol=1e-5, atol=1e-5)
    assert mod.weight.shape == (10, 64) and mod.weight_out.shape == (96, 10)


def test_factorised_only_when_it_saves_bytes():
    assert factorised_saves_bytes(40, (4096, 16384))
    assert not factorised_saves_bytes(30, (64, 48))  # 30*(112) = 3360 > 3072


# --- fast exact reduction (Gram route) against a float64 LAPACK SVD ------------------------------
from laser_export.lowrank import exact_algorithm  # noqa: E402


def _with_spectrum(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def _reference(w, k):
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return S, (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("shape", [(120, 300), (300, 120)])
@pytest.mark.parametrize("k", [1, 7, 60])
def test_gram_route_matches_float64_svd(shape, k):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    S, wk = _reference(w, k)
    svd = compute_svd(w, rank=k, algorithm="gram", dtype=torch.float64)
    assert svd.algorithm == "gram" and svd.exact and svd.components == k
    assert svd.U.shape == (shape[0], k) and svd.Vh.shape == (k, shape[1])  # only what rank k needs
    torch.testing.assert_close(svd.S, S[:k], rtol=1e-11, atol=0)
    assert float((svd.reconstruct(k) - wk).abs().max()) < 1e-11 * float(S[0])
    opt = math.sqrt(float((S[k:] ** 2).sum()))
    assert svd.optimal_error(k) == pytest.approx(opt, rel=1e-9)
    # float32 factors: closer to the float64 W_k than a float32 gesdd
    s32 = compute_svd(w, rank=k, algorithm="gram")
    U, S32, Vh = torch.linalg.svd(w, full_matrices=False)
    gesdd32 = float((((U[:, :k] * S32[:k]) @ Vh[:k]).double() - wk).abs().max())
    assert float((s32.reconstruct(k).double() - wk).abs().max()) <= gesdd32


def test_gram_route_near_degenerate_spectrum():
    # σ_k and σ_{k+1} differ by 1e-6 relative: W_k is still well defined and must match float64
    s = torch.linspace(10, 1, 80, dtype=torch.float64)
    k = 20
    s[k] = s[k - 1] * (1 - 1e-6)
    w = _with_spectrum(200, 500, s)
    S, wk = _reference(w, k)
    svd = compute_svd(w, rank=k, algorithm="gram", dtype=torch.float64)
    assert float((svd.reconstruct(k) - wk).abs().max()) < 1e-7
    torch.testing.assert_close(svd.S, S[:k], rtol=1e-12, atol=0)
    # a pair of equal singular values inside the kept block: any basis, same W_k
    s2 = torch.linspace(10, 1, 80, dtype=torch.float64)
    s2[5] = s2[4]
    w2 = _with_spectrum(200, 500, s2, seed=1)
    _, wk2 = _reference(w2, k)
    assert float((compute_svd(w2, rank=k, algorithm="gram", dtype=torch.float64).reconstruct(k) - wk2).abs().max()) < 1e-11


def test_gram_route_falls_back_to_gesdd_when_rank_deficient():
    s = torch.tensor([5.0, 3.0, 1.0] + [1e-9] * 7, dtype=torch.float64)
    w = _with_spectrum(40, 90, s)
    svd = compute_svd(w, rank=5, algorithm="gram", dtype=torch.float64)
    assert svd.algorithm == "gesdd"  # σ_5/σ_1 = 2e-10: Wᵀu/σ would be noise
    S, wk = _reference(w, 5)
    assert float((svd.reconstruct(5) - wk).abs().max()) < 1e-12


def test_exact_algorithm_choice_and_defaults():
    assert exact_algorithm((64, 200)) == "gesdd"
    assert exact_algorithm((4096, 16384)) == "gram" and exact_algorithm((16384, 4096)) == "gram"
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    svd = compute_svd(w)  # rank=None: every component
    assert svd.components == 20 and svd.algorithm == "gesdd"
    with pytest.raises(ValueError, match="out of range"):
        compute_svd(w, rank=21)


def test_reconstruct_in_target_dtype_matches_float_path():
    w = torch.randn(50, 70, generator=torch.Generator().manual_seed(2))
    svd = compute_svd(w, rank=10, algorithm="gram")
    half = svd.reconstruct(10, dtype=torch.float16, chunk_rows=7)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, svd.reconstruct(10).to(torch.float16), rtol=0, atol=0)
