"""Find the (layer, matrix, ρ) interventions that help on a benchmark, then write a recipe.

What makes it fast (vs the paper's loop of model copies, one SVD per ρ and batch-size-1 scoring):

* **no copies** — each candidate is swapped into the one loaded model with
  :func:`laser_export.intervene.replace_weight` and undone bit-exactly afterwards;
* **one SVD per matrix** — :class:`laser_export.intervene.SVDCache` serves every ρ (and the data-free
  SNR ranking) from the same decomposition;
* **prefix cache** — the inputs of every block from the lowest swept layer on are recorded in one full,
  batched pass over the validation set (:class:`laser_export.prefix.PrefixCache`, which is also the
  baseline); a candidate at layer ℓ then only runs blocks ℓ..L−1, the final norm and — lazily, on the
  positions the scorer reads — the LM head. Candidates are scored layer by layer, candidate-major;
* **batched scoring** — the exact batches of :func:`laser_export.evaluate.score_examples`.

Selection uses the validation split only: the best candidate by top-1 accuracy, ties broken by the
higher mean answer log-prob. Composition stacks the individually-helpful candidates greedily (best
first, one ρ per matrix), keeping each only if validation top-1 strictly improves, up to ``compose``
interventions. The chosen recipe is then scored once on the test split (baseline and reduced) and the
claims are written from that.

Every measured candidate is appended as one JSON line to a results file keyed by a *run key* (model,
dtype, benchmark, validation-split sha256); a rerun skips whatever is already there.

Data-free ranking: :func:`snr` — singular-value signal-to-noise with a Marchenko–Pastur threshold —
orders or prunes the sweep (``prune_snr``) and the sweep reports how well it predicted the winners.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from . import evaluate
from .architectures import Family, expand_matrix, module_name, num_layers
from .intervene import SVDCache, replace_weight
from .lowrank import as_matrix, factorised_saves_bytes, rank_for
from .prefix import PrefixCache
from .recipe import RecipeError

SELECTION_METRICS = ("top1", "logprob")  # lexicographic: accuracy, then mean answer log-prob
KEPT_METRICS = ("top1", "top1_no_article", "top5", "top10", "logprob", "logloss", "accuracy", "n")


# ---------------------------------------------------------------------------------------------
# candidates and the grid
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Candidate:
    layer: int
    matrix: str
    rho: float

    @property
    def key(self) -> str:
        return f"L{self.layer}.{self.matrix}.rho{self.rho:g}"

    @property
    def site(self) -> tuple[int, str]:
        return (self.layer, self.matrix)

    def as_intervention(self) -> dict:
        return {"layer": self.layer, "matrix": self.matrix, "rho": self.rho}


def set_key(cands: Sequence[Candidate]) -> str:
    return "+".join(c.key for c in cands)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``"20-29"``, ``"24,26,28"``, ``"-4"`` style negatives, or None (the last third of the model)."""
    if spec is None or spec == "":
        return list(range(n_layers - max(1, n_layers // 3), n_layers))
    layers: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (None, None)
                if lo is None:
                    raise ValueError
                a, b = int(lo), int(hi)
                layers += list(range(a, b + 1))
            else:
                v = int(part)
                layers.append(v + n_layers if v < 0 else v)
        except ValueError:
            raise RecipeError([f"--layers: cannot read {part!r} (use e.g. 20-29 or 24,26,28)"]) from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise RecipeError([f"--layers: model has {n_layers} layers (0..{n_layers - 1}), got {bad}"])
    return sorted(set(layers))


def parse_rhos(spec: str | Iterable[float]) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        try:
            v = float(item)
        except ValueError:
            raise RecipeError([f"--rhos: {item!r} is not a number"]) from None
        if not 0 < v <= 1:
            raise RecipeError([f"--rhos: ρ is the fraction of the max rank kept, in (0, 1]; got {v}"])
        out.append(v)
    if not out:
        raise RecipeError(["--rhos: no values"])
    return sorted(set(out))


def parse_matrices(spec: str | Iterable[str], family: Family) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item:
            for alias in expand_matrix(family, item):  # raises ArchitectureError (exit 2)
                if alias not in out:
                    out.append(alias)
    return out


# ---------------------------------------------------------------------------------------------
# data-free SNR (Marchenko–Pastur)
# ---------------------------------------------------------------------------------------------
def mp_median(beta: float, grid: int = 20001) -> float:
    """Median of the Marchenko–Pastur law with ratio ``beta`` = m/n ≤ 1 and unit variance."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    # x = lo + (hi-lo)(1-cos θ)/2 removes the square-root (and, at β=1, the 1/x) endpoint singularities
    theta = np.linspace(0.0, math.pi, grid)
    x = lo + (hi - lo) * (1 - np.cos(theta)) / 2
    integrand = ((hi - lo) ** 2 / 4) * np.sin(theta) ** 2 / (2 * math.pi * beta * np.maximum(x, 1e-300))
    if lo == 0.0:
        integrand[0] = (hi - lo) / (2 * math.pi * beta)  # limit θ→0 at β=1
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(theta))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, x))


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
    m, n = sorted((int(shape[0]), int(shape[1])))
    beta = m / n
    s = math.sqrt(float(S.pow(2).median()) / (n * mp_median(beta)))
    edge = s * (math.sqrt(n) + math.sqrt(m))
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


# ---------------------------------------------------------------------------------------------
# results log (resume)
# ---------------------------------------------------------------------------------------------
def run_key(**parts) -> str:
    """A stable id for (model, dtype, benchmark, split sha, ...): results of other runs are ignored."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultsLog:
    """Append-only JSONL: one line per measured candidate/set, written as soon as it is measured."""

    def __init__(self, path: str | Path | None, key: str):
        self.path = Path(path) if path else None
        self.key = key
        self.rows: dict[str, dict] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write
                if isinstance(row, dict) and row.get("run") == key and "id" in row:
                    self.rows[row["id"]] = row

    def get(self, ident: str) -> dict | None:
        return self.rows.get(ident)

    def add(self, ident: str, kind: str, metrics: dict, **extra) -> dict:
        row = {"run": self.key, "id": ident, "kind": kind, "metrics": metrics, **extra}
        self.rows[ident] = row
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False  # an interrupted write left a partial last line: start on a fresh line
            if self.path.is_file() and self.path.stat().st_size:
                with self.path.open("rb") as fh:
                    fh.seek(-1, 2)
                    torn = fh.read(1) != b"\n"
            with self.path.open("a") as fh:
                fh.write(("\n" if torn else "") + json.dumps(row) + "\n")
                fh.flush()
        return row


# ---------------------------------------------------------------------------------------------
# selection and composition
# ---------------------------------------------------------------------------------------------
def selection_key(metrics: dict) -> tuple[float, float]:
    return tuple(float(metrics.get(m, -math.inf)) for m in SELECTION_METRICS)  # type: ignore[return-value]


def compose_greedy(
    ranked: Sequence[Candidate],
    evaluate_set: Callable[[list[Candidate]], dict],
    single: dict[Candidate, dict],
    max_interventions: int,
    max_tries: int | None = None,
) -> tuple[list[Candidate], dict, list[dict]]:
    """Greedy stacking. ``ranked``: individually-helpful candidates, best first, one per site.

    Starts from ``ranked[0]`` alone; tries each next candidate on top of the kept set (scored by
    ``evaluate_set``); keeps it only when validation top-1 strictly improves. Stops at
    ``max_interventions`` kept or ``max_tries`` tried. Returns (kept, its metrics, trace).
    """
    if not ranked:
        return [], {}, []
    kept = [ranked[0]]
    current = single[ranked[0]]
    trace: list[dict] = []
    tries = 0
    for cand in ranked[1:]:
        if len(kept) >= max_interventions or (max_tries is not None and tries >= max_tries):
            break
        if any(c.site == cand.site for c in kept):
            continue
        tries += 1
        trial = kept + [cand]
        metrics = evaluate_set(trial)
        better = metrics["top1"] > current["top1"]
        trace.append({"set": [c.key for c in trial], "top1": metrics["top1"], "kept": better})
        if better:
            kept, current = trial, metrics
    return kept, current, trace


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    baseline: dict
    candidates: list[dict]  # {candidate fields, rank, metrics, delta}
    best: Candidate | None
    chosen: list[Candidate]
    chosen_metrics: dict
    compose_trace: list[dict]
    snr: list[dict]
    snr_report: dict
    timings: dict = field(default_factory=dict)
    n_scored: int = 0  # scoring calls actually made (not resumed)

    def to_json(self) -> dict:
        d = asdict(self)
        d["best"] = self.best.as_intervention() if self.best else None
        d["chosen"] = [c.as_intervention() for c in self.chosen]
        return d


def _metrics(result) -> dict:
    return {k: float(v) for k, v in result.metrics.items() if k in KEPT_METRICS}


class _Swapper:
    """Applies candidates to the model (one SVD per matrix) and undoes them in reverse order."""

    def __init__(self, model, family: Family, svd: SVDCache, storage: str):
        self.model, self.family, self.svd, self.storage = model, family, svd, storage

    def name(self, layer: int, alias: str) -> str:
        return module_name(self.model, self.family, layer, alias)

    def decomposition(self, layer: int, alias: str):
        name = self.name(layer, alias)
        w = as_matrix(self.model.get_submodule(name))
        return self.svd.get(name, w, min(w.shape))

    def shape(self, layer: int, alias: str) -> tuple[int, int]:
        w = as_matrix(self.model.get_submodule(self.name(layer, alias)))
        return int(w.shape[0]), int(w.shape[1])

    def apply(self, cands: Sequence[Candidate]) -> Callable[[], None]:
        undos = []
        try:
            for c in cands:
                name = self.name(c.layer, c.matrix)
                shape = self.shape(c.layer, c.matrix)
                k = rank_for(c.rho, shape)
                if k >= min(shape):
                    continue  # full rank: the model itself
                svd = self.decomposition(c.layer, c.matrix)
                factorised = self.storage == "factorised" and factorised_saves_bytes(k, shape)
                undos.append(replace_weight(self.model, name, svd, k, factorised))
        except BaseException:
            for u in reversed(undos):
                u()
            raise

        def undo():
            for u in reversed(undos):
                u()

        return undo


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .pipeline import console

    return Progress(
        TextColumn("[bold]search[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        disable=not enabled,
    )


def run_search(
    model,
    tokenizer,
    family: Family,
    examples: Sequence,
    *,
    layers: Sequence[int],
    matrices: Sequence[str],
    rhos: Sequence[float],
    batch_size: int = 32,
    results: ResultsLog | None = None,
    compose: int = 1,
    compose_tries: int = 6,
    prune_snr: float | None = None,
    rank_by_snr: bool = False,
    storage: str = "dense",
    svd: SVDCache | None = None,
    progress: bool = True,
    use_prefix_cache: bool = True,
) -> SearchResult:
    """Sweep ``layers × matrices × rhos`` on ``examples`` (the validation split) and compose.

    Model weights are unchanged when this returns (every swap is undone, also on errors).
    """
    results = results or ResultsLog(None, "ephemeral")
    svd = svd or SVDCache()
    swap = _Swapper(model, family, svd, storage)
    timings = {"svd_s": 0.0, "capture_s": 0.0, "score_s": 0.0}
    counter = {"n": 0}

    # data-free SNR per matrix (the SVDs are needed for the sweep anyway)
    snr_rows = []
    t0 = time.perf_counter()
    for layer in layers:
        for alias in matrices:
            dec = swap.decomposition(layer, alias)
            snr_rows.append({"layer": layer, "matrix": alias, **snr(dec.S, dec.shape)})
    timings["svd_s"] = time.perf_counter() - t0
    sites = [(r["layer"], r["matrix"]) for r in sorted(snr_rows, key=lambda r: -r["snr"])]
    if prune_snr is not None:
        if not 0 < prune_snr <= 1:
            raise RecipeError([f"--prune-snr: a fraction in (0, 1], got {prune_snr}"])
        keep = set(sites[: max(1, math.ceil(prune_snr * len(sites)))])
    else:
        keep = set(sites)
    # latest layers first: the cheapest to score and the paper's usual winners, so a cut-short sweep
    # (resumable) has the most useful part done
    site_order = sites if rank_by_snr else [(l, a) for l in sorted(layers, reverse=True) for a in matrices]
    site_order = [s for s in site_order if s in keep]

    cache: PrefixCache | None = None

    def score(forward_fn=None):
        counter["n"] += 1
        t = time.perf_counter()
        r = evaluate.score_examples(
            model, tokenizer, examples, batch_size=batch_size, progress=False, forward_fn=forward_fn
        )
        timings["score_s"] += time.perf_counter() - t
        return r

    def ensure_cache(start: int) -> PrefixCache | None:
        nonlocal cache
        if not use_prefix_cache:
            return None
        if cache is None or cache.start > start:
            cache = PrefixCache(model, family, start, lazy_capture=True)
            t = time.perf_counter()
            r = score(cache.capture)
            timings["capture_s"] += time.perf_counter() - t
            if results.get("baseline") is None:
                results.add("baseline", "baseline", _metrics(r))
        return cache

    def score_set(cands: Sequence[Candidate]) -> dict:
        start = min(c.layer for c in cands)
        pc = ensure_cache(min([start] + list(layers)))
        undo = swap.apply(cands)
        try:
            r = score(pc.replay(start) if pc else None)
        finally:
            undo()
        return _metrics(r)

    # baseline
    base_row = results.get("baseline")
    if base_row is None:
        if use_prefix_cache:
            ensure_cache(min(layers))
        else:
            results.add("baseline", "baseline", _metrics(score()))
        base_row = results.get("baseline")
    baseline = base_row["metrics"]

    grid = [Candidate(l, a, r) for (l, a) in site_order for r in rhos]
    todo = [c for c in grid if results.get(c.key) is None]
    with _progress(progress) as bar:
        task = bar.add_task("", total=len(grid), completed=len(grid) - len(todo))
        for c in todo:
            bar.update(task, description=c.key)
            shape = swap.shape(c.layer, c.matrix)
            k = rank_for(c.rho, shape)
            metrics = dict(baseline) if k >= min(shape) else score_set([c])
            results.add(c.key, "candidate", metrics, layer=c.layer, matrix=c.matrix, rho=c.rho, rank=k)
            bar.advance(task)

    single: dict[Candidate, dict] = {c: results.get(c.key)["metrics"] for c in grid}
    rows = [
        {
            **c.as_intervention(),
            "rank": rank_for(c.rho, swap.shape(c.layer, c.matrix)),
            "metrics": m,
            "delta_top1": m["top1"] - baseline["top1"],
        }
        for c, m in single.items()
    ]
    best = max(grid, key=lambda c: selection_key(single[c])) if grid else None

    # composition: helpful candidates, best ρ per site, best first
    per_site: dict[tuple[int, str], Candidate] = {}
    for c in sorted(grid, key=lambda c: selection_key(single[c]), reverse=True):
        if single[c]["top1"] > baseline["top1"] and c.site not in per_site:
            per_site[c.site] = c
    ranked = list(per_site.values())

    def evaluate_set(cands: list[Candidate]) -> dict:
        ident = "set:" + set_key(cands)
        row = results.get(ident)
        if row is None:
            row = results.add(ident, "set", score_set(cands), interventions=[c.as_intervention() for c in cands])
        return row["metrics"]

    if ranked:
        chosen, chosen_metrics, trace = compose_greedy(ranked, evaluate_set, single, compose, compose_tries)
    else:  # nothing beats the baseline on validation: report the best anyway, flagged by delta <= 0
        chosen, chosen_metrics, trace = ([best], single[best], []) if best else ([], {}, [])

    # how well did the data-free SNR predict the sweep?
    gains = {}
    for c in grid:
        gains[c.site] = max(gains.get(c.site, -math.inf), single[c]["top1"] - baseline["top1"])
    snr_of = {(r["layer"], r["matrix"]): r["snr"] for r in snr_rows}
    swept = [s for s in snr_of if s in gains]
    rank_by = [s for s in sites if s in gains]
    report = {
        "spearman_snr_vs_gain": spearman([snr_of[s] for s in swept], [gains[s] for s in swept]),
        "n_matrices": len(swept),
        "pruned_to": len(keep) if prune_snr is not None else None,
    }
    if best is not None:
        pos = sites.index(best.site) + 1
        report.update(
            winner=best.key,
            winner_snr_rank=pos,
            winner_snr_rank_of=len(sites),
            winner_in_top_quarter_by_snr=pos <= max(1, math.ceil(len(sites) / 4)),
        )
    return SearchResult(
        baseline=baseline,
        candidates=rows,
        best=best,
        chosen=chosen,
        chosen_metrics=chosen_metrics,
        compose_trace=trace,
        snr=snr_rows,
        snr_report=report,
        timings=timings,
        n_scored=counter["n"],
    )


def evaluate_recipe(
    model, tokenizer, family: Family, examples, chosen: Sequence[Candidate], *, batch_size: int = 32,
    storage: str = "dense", svd: SVDCache | None = None, progress: bool = True, use_prefix_cache: bool = True,
):
    """(baseline ScoreResult, reduced ScoreResult) on ``examples`` — one full pass plus one replay."""
    swap = _Swapper(model, family, svd or SVDCache(), storage)
    start = min(c.layer for c in chosen)
    pc = PrefixCache(model, family, start, lazy_capture=True) if use_prefix_cache else None
    kw = dict(batch_size=batch_size, progress=progress)
    base = evaluate.score_examples(model, tokenizer, examples, description="test: baseline",
                                   forward_fn=pc.capture if pc else None, **kw)
    undo = swap.apply(chosen)
    try:
        red = evaluate.score_examples(model, tokenizer, examples, description="test: reduced",
                                      forward_fn=pc.replay(start) if pc else None, **kw)
    finally:
        undo()
    return base, red


# ---------------------------------------------------------------------------------------------
# outputs: sweep JSON, plot, recipe
# ---------------------------------------------------------------------------------------------
def plot_sweep(result: SearchResult, path: str | Path) -> Path:
    """Per matrix type a layer × ρ heatmap of validation top-1 delta vs the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    mats = list(dict.fromkeys(r["matrix"] for r in result.candidates))
    layers = sorted({r["layer"] for r in result.candidates})
    rhos = sorted({r["rho"] for r in result.candidates})
    base = result.baseline["top1"]
    deltas = [r["delta_top1"] for r in result.candidates]
    lim = max(1e-9, max(abs(d) for d in deltas)) if deltas else 1.0
    fig, axes = plt.subplots(1, max(1, len(mats)), figsize=(3.2 * max(1, len(mats)) + 1, 0.35 * len(layers) + 2), squeeze=False)
    im = None
    for ax, mat in zip(axes[0], mats):
        grid = np.full((len(layers), len(rhos)), np.nan)
        for r in result.candidates:
            if r["matrix"] == mat:
                grid[layers.index(r["layer"]), rhos.index(r["rho"])] = r["delta_top1"] * 100
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim * 100, vmax=lim * 100, aspect="auto", origin="lower")
        ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_xlabel("ρ (fraction of rank kept)")
        ax.set_ylabel("layer")
        ax.set_title(f"{mat}: Δ top-1 (pts)\nbaseline {base:.4f}", fontsize=9)
        for i in range(len(layers)):
            for j in range(len(rhos)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Δ top-1, points")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def build_recipe_dict(
    *,
    name: str,
    source: str,
    chosen: Sequence[Candidate],
    benchmark: dict,
    baseline_acc: float,
    reduced_acc: float,
    tolerance: float,
    storage: str,
    template: dict | None = None,
) -> dict:
    data = dict(template or {})
    data["name"] = name
    model = dict(data.get("model") or {})
    model["source"] = source
    data["model"] = model
    data["interventions"] = [c.as_intervention() for c in chosen]
    data["storage"] = storage
    data["benchmark"] = {"name": benchmark["name"], "split": "test", **{k: v for k, v in benchmark.items() if k != "name"}}
    data["claims"] = {
        "baseline": {"accuracy": round(baseline_acc, 6)},
        "reduced": {"accuracy": round(reduced_acc, 6)},
        "tolerance": tolerance,
    }
    order = ["name", "description", "model", "interventions", "reduction", "storage", "benchmark", "claims", "export"]
    return {k: data[k] for k in order if k in data} | {k: v for k, v in data.items() if k not in order}


def _leading_comments(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            out.append(line)
        else:
            break
    return out


def _yaml_text(data: dict) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def repr_dict(dumper, value):  # leaf mappings (one intervention, a claim) on one line
        flow = all(not isinstance(v, (dict, list)) for v in value.values())
        return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flow and len(value) <= 4)

    def repr_list(dumper, value):  # lists of scalars inline: [safetensors, onnx]
        flow = all(not isinstance(v, (dict, list)) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    _Dumper.add_representer(dict, repr_dict)
    _Dumper.add_representer(list, repr_list)
    out = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            block = yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
        else:
            block = yaml.safe_dump({key: value}, sort_keys=False, width=120)
        if key == "interventions":
            block = block.replace("\n- ", "\n  - ")
        out.append(block)
    return "".join(out)


def write_recipe(path: str | Path, data: dict, comments: Sequence[str]) -> None:
    """Validate with the recipe schema, then write ``data`` as given (no defaults added) with
    ``comments`` on top, atomically."""
    from .recipe import parse_recipe

    parse_recipe(data)
    text = "\n".join(comments) + ("\n" if comments else "") + _yaml_text(data)
    parse_recipe(__import__("yaml").safe_load(text))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# CLI entry point
# ---------------------------------------------------------------------------------------------
def main(args) -> int:
    import yaml

    from .benchmarks import load_split, subsample_examples  # noqa: F401
    from .pipeline import console
    from .recipe import load_recipe
    from .sources import family_of, resolve_source

    template, comments = {}, []
    if getattr(args, "template", None):
        t_recipe, t_text = load_recipe(args.template)
        template = yaml.safe_load(t_text)
        comments = _leading_comments(t_text)
        template.pop("claims", None)
    t_bench = template.get("benchmark") or {}
    source = args.model or (template.get("model") or {}).get("source")
    bench_name = args.benchmark or t_bench.get("name")
    if not source or not bench_name:
        raise RecipeError(["search: give --model and --benchmark (or a --template recipe that names them)"])
    pick = lambda a, key, default: a if a is not None else t_bench.get(key, default)  # noqa: E731
    bench = {
        "name": bench_name,
        "path": pick(args.benchmark_path, "path", None),
        "seed": pick(args.seed, "seed", 0),
        "validation_fraction": pick(args.validation_fraction, "validation_fraction", 0.2),
        "subsample": pick(args.subsample, "subsample", None),
        "metric": "top1",
        "batch_size": pick(args.batch_size, "batch_size", 32),
    }
    bench = {k: v for k, v in bench.items() if v is not None}
    storage = args.storage or template.get("storage") or "dense"
    dtype = (template.get("model") or {}).get("dtype", "float32")

    out = Path(args.out)
    stem = out.with_suffix("")
    results_path = Path(args.results) if args.results else stem.parent / f"{stem.name}.search.jsonl"

    resolved = resolve_source(source)
    config = resolved.load_config()
    family = family_of(config)
    n_layers = num_layers(config)
    layers = parse_layers(args.layers, n_layers)
    matrices = parse_matrices(args.matrices, family)
    rhos = parse_rhos(args.rhos)

    split = load_split(bench_name, path=bench.get("path"), seed=bench["seed"],
                       validation_fraction=bench["validation_fraction"], subsample=bench.get("subsample"))
    validation = split.validation
    if args.max_examples:
        validation = validation[: args.max_examples]
    from .benchmarks import examples_sha256

    key = run_key(model=source, revision=resolved.revision, dtype=dtype, benchmark=bench_name,
                  validation=examples_sha256(validation), storage=storage)
    log = ResultsLog(results_path, key)
    console.print(
        f"search: {len(layers)} layers × {len(matrices)} matrices × {len(rhos)} ρ on {len(validation)} validation "
        f"examples; {len(log.rows)} results already in {results_path}"
    )
    with console.status(f"loading {resolved.describe()}"):
        tokenizer = resolved.load_tokenizer()
        model = resolved.load_model(family, dtype)
    svd = SVDCache()
    t0 = time.perf_counter()
    result = run_search(
        model, tokenizer, family, validation, layers=layers, matrices=matrices, rhos=rhos,
        batch_size=bench["batch_size"], results=log, compose=args.compose, compose_tries=args.compose_tries,
        prune_snr=args.prune_snr, rank_by_snr=args.rank_by_snr, storage=storage, svd=svd,
        progress=not args.no_progress,
    )
    result.timings["search_s"] = time.perf_counter() - t0
    if not result.chosen:
        raise RecipeError(["search: no candidates were swept"])

    top = sorted(result.candidates, key=lambda r: selection_key(r["metrics"]), reverse=True)[:10]
    console.print(f"validation baseline top1 {result.baseline['top1']:.4f} (n={int(result.baseline['n'])})")
    for r in top:
        m = r["metrics"]
        console.print(f"  L{r['layer']:>2} {r['matrix']:<6} ρ={r['rho']:<5g} k={r['rank']:<4} top1 {m['top1']:.4f} "
                      f"({r['delta_top1'] * 100:+.2f} pts) logprob {m['logprob']:.3f}")
    console.print(f"chosen on validation: {set_key(result.chosen)} → top1 {result.chosen_metrics['top1']:.4f}")

    test_info = {}
    if not args.skip_test:
        base, red = evaluate_recipe(model, tokenizer, family, split.test, result.chosen,
                                    batch_size=bench["batch_size"], storage=storage, svd=svd,
                                    progress=not args.no_progress)
        ci = evaluate.paired_bootstrap(base.hits("top1"), red.hits("top1"))
        test_info = {
            "n": len(split.test),
            "baseline": {k: base.metrics.get(k) for k in KEPT_METRICS if k in base.metrics},
            "reduced": {k: red.metrics.get(k) for k in KEPT_METRICS if k in red.metrics},
            "delta_top1_bootstrap": ci,
        }
        if "top1_no_article" in base.metrics:
            test_info["delta_top1_no_article_bootstrap"] = evaluate.paired_bootstrap(
                base.hits("top1_no_article"), red.hits("top1_no_article"))
        console.print(
            f"test (n={len(split.test)}): top1 {base.metrics['top1']:.4f} → {red.metrics['top1']:.4f} "
            f"(Δ {ci['estimate'] * 100:+.2f} pts, 95% CI [{ci['ci95'][0] * 100:+.2f}, {ci['ci95'][1] * 100:+.2f}])"
        )
        if red.metrics["top1"] <= base.metrics["top1"]:
            console.print("[yellow]warning:[/] the validation choice does not improve the test split")

    sweep = {"run": key, "model": source, "benchmark": bench, "layers": layers, "matrices": matrices, "rhos": rhos,
             "validation_n": len(validation), "results_file": str(results_path), **result.to_json(), "test": test_info}
    json_path = stem.parent / f"{stem.name}.sweep.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(sweep, indent=1))
    png = plot_sweep(result, stem.parent / f"{stem.name}.sweep.png")
    console.print(f"wrote {json_path} and {png}")

    if test_info:
        tol = args.tolerance
        name = args.name or template.get("name") or stem.name
        data = build_recipe_dict(
            name=name, source=source, chosen=result.chosen, benchmark=bench,
            baseline_acc=test_info["baseline"]["top1"], reduced_acc=test_info["reduced"]["top1"],
            tolerance=tol, storage=storage, template=template,
        )
        ci = test_info["delta_top1_bootstrap"]
        comments = list(comments) + [
            f"# Found by `laser-export search` on the validation split (n={len(validation)}, {len(result.candidates)} "
            f"candidates: layers {layers[0]}-{layers[-1]}, {','.join(matrices)}, rho {','.join(f'{r:g}' for r in rhos)});",
            f"# claims measured once on the held-out test split (n={len(split.test)}); test top1 delta "
            f"{ci['estimate'] * 100:+.2f} pts, 95% paired-bootstrap CI [{ci['ci95'][0] * 100:+.2f}, {ci['ci95'][1] * 100:+.2f}].",
            f"# tolerance {tol:g}: the scoring is deterministic on CPU; the slack only absorbs argmax near-ties that flip "
            "with thread count / batch layout.",
        ]
        write_recipe(out, data, comments)
        console.print(f"wrote {out}")
    return 0


__all__ = [
    "Candidate",
    "ResultsLog",
    "SearchResult",
    "compose_greedy",
    "evaluate_recipe",
    "mp_median",
    "parse_layers",
    "parse_matrices",
    "parse_rhos",
    "plot_sweep",
    "run_key",
    "run_search",
    "selection_key",
    "snr",
    "spearman",
    "write_recipe",
]
