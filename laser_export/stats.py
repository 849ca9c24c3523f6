"""Statistics of paired scores: the paired bootstrap behind every Δ and its 95% CI."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of ``mean(b - a)`` over examples.

    ``a``/``b`` are per-example values (e.g. ``ScoreResult.hits("top1")``) for the *same* examples in
    the same order. Example indices are resampled with replacement ``n_resamples`` times
    (``numpy.random.default_rng(seed)``); the 95% CI is the 2.5/97.5 percentile of the resampled means.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one example")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bound memory: chunk x n indices at a time
    for s in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - s)
        idx = rng.integers(0, n, size=(m, n))
        means[s : s + m] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"estimate": float(diff.mean()), "ci95": [float(lo), float(hi)], "n": int(n)}


#: A top-1 gain is called partly answer format when the article-excluded top-1 delta is under this share of
#: it, or its 95% CI includes 0 (the rule of the model card and of the search's recipe header alike).
FORMAT_GAIN_RATIO = 0.5


def partly_format(top1: float | None, no_article: float | None, no_article_ci95) -> bool:
    """Is a positive top-1 delta partly a change of answer format (whether the first token is an article)?"""
    if top1 is None or top1 <= 0:
        return False
    if no_article is None or no_article < FORMAT_GAIN_RATIO * top1:
        return True
    return bool(no_article_ci95) and len(no_article_ci95) == 2 and no_article_ci95[0] <= 0.0 <= no_article_ci95[1]
