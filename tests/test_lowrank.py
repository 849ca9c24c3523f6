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
