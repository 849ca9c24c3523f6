"""The sweep heatmap: per matrix type a layer × ρ grid of the validation change vs the baseline.

``metric="top1"``: Δ top-1 accuracy in points (higher is better). ``metric="logloss"``: Δ validation
log-loss (mean −log p per answer token; lower is better), the view of the LASER paper's Figure 1.
``metric="both"``: one row of panels for each. The chosen candidate(s) are outlined, the best single
candidate starred; the title names the model, benchmark and the number of validation examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..options import PLOT_METRICS
from .grid import rho_label, rho_order


_VIEW = {
    # metric -> (row key, scale, label, colormap: good change is blue in both)
    "top1": ("delta_top1", 100.0, "Δ top-1 (points)", "RdBu"),
    "logloss": ("delta_logloss", 1.0, "Δ log-loss (nats/token)", "RdBu_r"),
}


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_sweep(result, path: str | Path, *, metric: str = "top1", model: str = "", benchmark: str = "") -> Path:
    """Write the heatmap PNG for a :class:`~laser_export.search.sweep.SearchResult`; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if metric not in PLOT_METRICS:
        raise ValueError(f"plot metric must be one of {', '.join(PLOT_METRICS)}, got {metric!r}")
    views = ["top1", "logloss"] if metric == "both" else [metric]
    views = [v for v in views if all(_VIEW[v][0] in r for r in result.candidates)] or ["top1"]
    path = Path(path)
    mats = list(dict.fromkeys(r["matrix"] for r in result.candidates)) or ["-"]
    layers = sorted({r["layer"] for r in result.candidates})
    rhos = sorted({r["rho"] for r in result.candidates}, key=rho_order)
    chosen = {(c.layer, c.matrix, c.rho) for c in result.chosen}
    best = (result.best.layer, result.best.matrix, result.best.rho) if result.best else None

    cell_w, cell_h = 0.62, 0.42
    width = max(4.0, len(rhos) * cell_w + 1.6) * len(mats) + 1.4
    height = (max(2.2, len(layers) * cell_h + 1.4)) * len(views) + 1.0
    fig, axes = plt.subplots(len(views), len(mats), figsize=(width, height), squeeze=False,
                             constrained_layout=True)
    n = int(result.baseline.get("n", 0))
    who = " · ".join(x for x in (model, benchmark) if x)
    base_parts = [f"top-1 {result.baseline['top1']:.3f}"]
    if "logloss" in result.baseline:
        base_parts.append(f"log-loss {result.baseline['logloss']:.3f}")
    fig.suptitle(
        f"LASER sweep{': ' + who if who else ''}\nvalidation n={n}, baseline {', '.join(base_parts)}; "
        "□ chosen, ★ best single",
        fontsize=11,
    )
    for row, view in enumerate(views):
        key, scale, label, cmap_name = _VIEW[view]
        values = [r[key] * scale for r in result.candidates if key in r]
        lim = max(1e-9, max((abs(v) for v in values), default=1.0))
        cmap = plt.get_cmap(cmap_name)
        im = None
        for col, mat in enumerate(mats):
            ax = axes[row][col]
            grid = np.full((len(layers), len(rhos)), np.nan)
            for r in result.candidates:
                if r["matrix"] == mat and key in r:
                    grid[layers.index(r["layer"]), rhos.index(r["rho"])] = r[key] * scale
            im = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", origin="lower")
            ax.set_xticks(range(len(rhos)), [rho_label(x) for x in rhos], fontsize=9)
            ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=9)
            ax.set_xlabel("ρ (fraction of rank kept)", fontsize=9)
            ax.set_ylabel("layer", fontsize=9)
            ax.set_title(f"{mat}: {label}", fontsize=10)
            fmt = "{:+.1f}" if view == "top1" else "{:+.3f}"
            for i in range(len(layers)):
                for j in range(len(rhos)):
                    v = grid[i, j]
                    if np.isnan(v):
                        continue
                    color = _text_color(cmap((v + lim) / (2 * lim)))
                    site = (layers[i], mat, rhos[j])
                    ax.text(j, i, fmt.format(v) + (" ★" if site == best else ""), ha="center", va="center",
                            fontsize=8, color=color, fontweight="bold" if site in chosen else "normal")
                    if site in chosen:
                        ax.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, lw=2.2, ec="black"))
        if im is not None:
            fig.colorbar(im, ax=list(axes[row]), shrink=0.9, label=label)
    from ..atomic import open_atomic

    try:
        with open_atomic(path, "wb") as f:
            fig.savefig(f, dpi=130, format=Path(path).suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


def heatmap_grid(result, matrix: str, key: str = "delta_top1") -> tuple[list[int], list[float], np.ndarray]:
    """(layers, rhos, values) of one panel, as plotted (for tests and notebooks)."""
    layers = sorted({r["layer"] for r in result.candidates})
    rhos = sorted({r["rho"] for r in result.candidates}, key=rho_order)
    grid = np.full((len(layers), len(rhos)), np.nan)
    for r in result.candidates:
        if r["matrix"] == matrix and key in r:
            grid[layers.index(r["layer"]), rhos.index(r["rho"])] = r[key]
    return layers, rhos, grid


__all__: Sequence[str] = ["heatmap_grid", "plot_sweep"]
