"""Data-free ranking: singular-value signal-to-noise with a Marchenko–Pastur noise edge, and the
Spearman correlation used to report how well it predicted a sweep."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..lowrank import mp_edge


def snr(singular_values: torch.Tensor, shape: tuple[int, int]) -> dict:
    """Signal-to-noise of a weight matrix from its singular values (no data).

    For an m×n (m ≤ n) matrix of i.i.d. noise with entry std s, the squared singular values divided
    by n follow the Marchenko–Pastur law with ratio β = m/n, and the largest singular value sits at
    s(√n + √m). We estimate s from the *median* singular value (robust to a few large signal
    directions, as in Gavish & Donoho 2014): s = sqrt(median(σ²) / (n · μ_β)) with μ_β the MP median,
    take λ+ = s(√n + √m) as the noise edge, and report

        snr = Σ σ_i (σ_i > λ+) / Σ σ_i (σ_i ≤ λ+)

    (laserRMT uses the same ratio with s = IQR(σ)/1.349 and λ+ = s(1+√β), then divides by σ_max;
    their σ estimate is not on the MP scale, so we do not copy it). High SNR: much of the spectrum
    stands above what noise of that size would produce.
    """
    S = singular_values.detach().double().flatten().sort(descending=True).values
    s, edge = mp_edge(S, shape)  # the same noise estimate and edge as ``rank: auto``
    above = S[S > edge]
    below = S[S <= edge]
    noise = float(below.sum())
    return {
        "snr": float(above.sum()) / noise if noise > 0 else math.inf,
        "noise_std": s,
        "threshold": edge,
        "n_signal": int(above.numel()),
        "sigma_max": float(S[0]),
    }


def _average_ranks(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    if len(a) < 3:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])
