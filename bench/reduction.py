"""Exact vs randomized truncated SVD (time, excess error) and factorised vs dense (bytes, latency).

Prints ratios measured in one run (machines here are noisy; compare only within a run):
    python bench/reduction.py            # all sizes, the 4096×16384 exact SVD takes ~1–2 min on 2 cores
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


def svd_section(shapes, rhos):
    print("## exact vs randomized SVD (float32; randomized: q = k + 10, 4 power iterations)")
    print(f"{'shape':>12} {'kind':>9} {'rho':>5} {'k':>4} {'exact s':>8} {'rand s':>7} {'speed-up':>8} {'excess err':>10}")
    for (m, n), kind in shapes:
        w = decaying(m, n) if kind == "decaying" else torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        t_exact, exact = timed(lambda: compute_svd(w))
        for rho in rhos:
            k = rank_for(rho, (m, n))
            t_rand, rand = timed(lambda: compute_svd(w, method="randomized", rank=k, seed=0))
            opt = exact.optimal_error(k)
            err = float((w - rand.reconstruct(k)).norm())
            print(f"{m:>5}×{n:<6} {kind:>9} {rho:>5} {k:>4} {t_exact:>8.2f} {t_rand:>7.3f} "
                  f"{t_exact / t_rand:>7.0f}× {100 * (err - opt) / opt:>9.3f}%")
    print("(exact is computed once per matrix and reused for every rho; its time is per matrix)")


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
    shapes = [((1024, 1024), "decaying"), ((1024, 1024), "gaussian"), ((4096, 4096), "decaying")]
    if not args.quick:
        shapes.append(((4096, 16384), "gaussian"))
    svd_section(shapes, rhos=(0.01, 0.05, 0.1))
    storage_section([
        ("SmolLM2 gate_proj", (1536, 576), 0.05),
        ("GPT-J fc_in", (16384, 4096), 0.01),
        ("GPT-J fc_in", (16384, 4096), 0.1),
    ])


if __name__ == "__main__":
    main()
