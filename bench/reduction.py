"""laser-export exact SVD vs torch.linalg.svd (time, accuracy vs float64), exact vs randomized truncated SVD (time, excess error) and factorised vs dense (bytes, latency).

Prints ratios measured in one run (machines here are noisy; compare only within a run):
    python bench/reduction.py            # incl. 4096×16384: float32 gesdd, ours, float64 reference (~5 min on 2 cores)
    python bench/reduction.py --quick    # skip the 4096×16384 matrix
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from laser_export.lowrank import LowRankLinear, compute_svd, rank_for


def timed(fn, repeat=1):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def decaying(m, n, seed=0):
    """A matrix with a power-law spectrum (like trained weights) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.7)
    return (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g)


def _wk(U, S, Vh, k):
    return ((U[:, :k].double() * S[:k].double()) @ Vh[:k].double())


def exact_section(m=4096, n=16384, rhos=(0.01, 0.05, 0.1)):
    """laser-export's exact SVD vs torch.linalg.svd float32 (gesdd): time, and accuracy vs float64 SVD."""
    print(f"## exact SVD of a {m}×{n} float32 matrix (Gaussian: flat spectrum, the hard case for accuracy)")
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    ks = [rank_for(r, (m, n)) for r in rhos]
    t_ref32, (U32, S32, Vh32) = timed(lambda: torch.linalg.svd(w, full_matrices=False))
    t_fast, fast = timed(lambda: compute_svd(w, rank=max(ks)))
    t_ref64, (U64, S64, Vh64) = timed(lambda: torch.linalg.svd(w.double(), full_matrices=False))
    print(f"torch.linalg.svd float32 (gesdd): {t_ref32:.1f} s; laser-export exact ({fast.algorithm}, top {max(ks)} "
          f"kept): {t_fast:.1f} s; float64 gesdd (reference): {t_ref64:.1f} s")
    print(f"SPEED-UP exact vs torch.linalg.svd float32: {t_ref32 / t_fast:.1f}x (target >= 4x)")
    print(f"{'rho':>5} {'k':>4} {'max|dW_k| gesdd32':>18} {'max|dW_k| ours':>15} {'max|dS|/S1 gesdd32':>19} "
          f"{'max|dS|/S1 ours':>16} {'err ours vs opt':>16}")
    for rho, k in zip(rhos, ks):
        ref = _wk(U64, S64, Vh64, k)
        d32 = float((_wk(U32, S32, Vh32, k) - ref).abs().max())
        dfast = float((fast.reconstruct(k, dtype=torch.float64) - ref).abs().max())
        s32 = float((S32[:k].double() - S64[:k]).abs().max() / S64[0])
        sf = float((fast.S[:k].double() - S64[:k]).abs().max() / S64[0])
        opt = float(S64[k:].pow(2).sum().sqrt())
        print(f"{rho:>5} {k:>4} {d32:>18.2e} {dfast:>15.2e} {s32:>19.2e} {sf:>16.2e} "
              f"{(fast.optimal_error(k) - opt) / opt:>+16.1e}")
        del ref
    print("(errors vs torch.linalg.svd in float64; ours: float64 Gram, top eigenpairs, factors stored float32)")
    return w, (U64, S64, Vh64)


def svd_section(shapes, rhos, big=None):
    print("\n## exact vs randomized SVD (randomized: q = k + 10, 4 power iterations; errors in float64)")
    print(f"{'shape':>12} {'kind':>9} {'rho':>5} {'k':>4} {'exact s':>8} {'rand s':>7} {'speed-up':>8} {'excess err':>10}")
    cases = [((m, n), kind, None) for (m, n), kind in shapes]
    if big is not None:
        cases.append((tuple(big[0].shape), "gaussian", big))
    for (m, n), kind, given in cases:
        if given is not None:
            w = given[0]
        else:
            w = decaying(m, n) if kind == "decaying" else torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        ks = [rank_for(rho, (m, n)) for rho in rhos]
        t_exact, exact = timed(lambda: compute_svd(w, rank=max(ks)))
        S64 = given[1][1] if given is not None else torch.linalg.svdvals(w.double())
        for rho, k in zip(rhos, ks):
            t_rand, rand = timed(lambda: compute_svd(w, method="randomized", rank=k, seed=0))
            opt = float(S64[k:].pow(2).sum().sqrt())
            err = float((w.double() - rand.reconstruct(k, dtype=torch.float64)).norm())
            print(f"{m:>5}×{n:<6} {kind:>9} {rho:>5} {k:>4} {t_exact:>8.2f} {t_rand:>7.3f} "
                  f"{t_exact / t_rand:>7.0f}× {100 * (err - opt) / opt:>9.3f}%")
    print("(exact is computed once per matrix for the largest rank and reused for smaller ones)")


def storage_section(cases, batch=8, seq=32, repeat=15):
    print("\n## factorised vs dense: bytes and forward latency (float32, x of shape [8, 32, in])")
    print(f"{'matrix':>24} {'rho':>5} {'k':>4} {'dense MiB':>9} {'fact MiB':>8} {'bytes ratio':>11} {'latency ratio':>13}")
    for label, (m, n), rho in cases:
        k = rank_for(rho, (m, n))
        lin = torch.nn.Linear(n, m, bias=False)
        left, right = compute_svd(lin.weight.detach()).factors(k)
        low = LowRankLinear.from_factors(left, right, None, torch.float32)
        x = torch.randn(batch, seq, n)
        t_d, t_f = [], []
        with torch.no_grad():
            for _ in range(repeat):  # interleaved, so drift hits both alike
                t_d.append(timed(lambda: lin(x))[0])
                t_f.append(timed(lambda: low(x))[0])
        bd = sum(p.numel() * 4 for p in lin.parameters())
        bf = sum(p.numel() * 4 for p in low.parameters())
        print(f"{label:>24} {rho:>5} {k:>4} {bd / 2**20:>9.2f} {bf / 2**20:>8.3f} {bf / bd:>10.3f}× "
              f"{statistics.median(t_f) / statistics.median(t_d):>12.3f}×")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    big = None if args.quick else exact_section()
    shapes = [((1024, 1024), "decaying"), ((1024, 1024), "gaussian"), ((4096, 4096), "decaying")]
    svd_section(shapes, rhos=(0.01, 0.05, 0.1), big=big)
    del big
    storage_section([
        ("SmolLM2 gate_proj", (1536, 576), 0.05),
        ("GPT-J fc_in", (16384, 4096), 0.01),
        ("GPT-J fc_in", (16384, 4096), 0.1),
    ])


if __name__ == "__main__":
    main()
