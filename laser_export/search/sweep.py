"""The sweep: score every candidate of the grid on the validation split, pick the best, compose.

What makes it fast (vs the paper's loop of model copies, one SVD per ρ and batch-size-1 scoring):

* **no copies** — each candidate is swapped into the one loaded model with
  :func:`laser_export.intervene.apply` (the reduction run and verify use) and undone bit-exactly afterwards;
* **one SVD per matrix** — :class:`laser_export.intervene.SVDCache` serves every ρ (and the data-free
  SNR ranking) from the same decomposition;
* **prefix cache** — the inputs of every block from the lowest swept layer on are recorded in one full,
  batched pass over the validation set (:class:`laser_export.prefix.PrefixCache`, which is also the
  baseline); a candidate at layer ℓ then only runs blocks ℓ..L−1, the final norm and — lazily, on the
  positions the scorer reads — the LM head. Candidates are scored layer by layer, candidate-major;
* **batched scoring** — the exact batches of :func:`laser_export.evaluate.score_examples`;
* **many workers** (optional) — a :class:`laser_export.search.ray_pool.RayPool` scores groups of
  candidates (one group per layer) on Ray actors, each holding the model and its own prefix cache.

Selection uses the validation split only: the best candidate by top-1 accuracy, ties broken by the
higher mean answer log-prob. Composition stacks the individually-helpful candidates greedily (best
first, one ρ per matrix), keeping each only if validation top-1 strictly improves, up to ``compose``
interventions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

from .. import evaluate, intervene
from ..architectures import Family, module_name, num_experts
from ..intervene import SVDCache, Target, target_matrix
from ..lowrank import AutoRank, auto_rank, rank_for, singular_values
from ..metrics import SEARCH_KEPT
from ..prefix import PrefixCache
from ..progress import bar as progress_bar
from ..recipe import RecipeError
from .compose import compose_beam, compose_greedy, selection_key
from .grid import AUTO, Candidate, candidate_id, set_id
from .results import ResultsLog
from .snr import snr, spearman

#: what a sweep keeps of each score (the metrics table's single-position metrics, and ``n``)
KEPT_METRICS = SEARCH_KEPT


@dataclass
class SearchResult:
    baseline: dict
    candidates: list[dict]  # {candidate fields, rank, metrics, delta_top1, delta_logloss}
    best: Candidate | None
    chosen: list[Candidate]
    chosen_metrics: dict
    compose_trace: list[dict]
    snr: list[dict]
    snr_report: dict
    timings: dict = field(default_factory=dict)
    n_scored: int = 0  # scoring calls actually made (not resumed)
    halving: dict | None = None  # --strategy halving: rungs, survivors, examples scored vs the grid's

    def to_json(self) -> dict:
        d = asdict(self)
        d["best"] = self.best.as_intervention() if self.best else None
        d["chosen"] = [c.as_intervention() for c in self.chosen]
        return d


def metrics_of(result, tasks: Sequence[tuple[str, int, float]] | None = None) -> dict:
    """The kept metrics of a ScoreResult. ``tasks`` — (name, number of examples, weight) of consecutive
    parts of the examples (several benchmarks searched at once): each part's means are kept as
    ``task:<name>:<metric>``, and each metric itself is the weighted mean over the tasks (weights summing
    to 1), so that the selection's top-1 is the mean paired gain over the tasks plus a constant (the
    baselines' weighted mean)."""
    if not tasks:
        return {k: float(v) for k, v in result.metrics.items() if k in KEPT_METRICS}
    out: dict = {"n": float(len(result.per_example))}
    lo, per_task = 0, []
    for name, n, weight in tasks:
        rows = result.per_example[lo : lo + n]
        lo += n
        means = {k: sum(float(r[k]) for r in rows if k in r) / max(1, sum(1 for r in rows if k in r))
                 for k in KEPT_METRICS if k != "n" and any(k in r for r in rows)}
        out.update({f"task:{name}:{k}": v for k, v in means.items()})
        per_task.append((weight, means))
    for k in KEPT_METRICS:
        if k != "n" and all(k in m for _, m in per_task):
            out[k] = sum(w * m[k] for w, m in per_task)
    return out


class Swapper:
    """Applies candidates to the model through :func:`laser_export.intervene.apply` (the reduction of
    run and verify) and undoes them bit-exactly.

    One SVD per matrix: the decomposition is asked for every component (``full_svd=True``), so the
    search's :class:`SVDCache` serves every ρ of a matrix, and its SNR, from the same one. The
    per-matrix manifest entries :func:`~laser_export.intervene.apply` also builds cost next to nothing
    here: for an exact SVD the Frobenius error comes from the dropped singular values (a randomized SVD,
    which a template's ``reduction`` can ask for, pays one extra (m×k)(k×n) product per swap)."""

    def __init__(self, model, family: Family, svd: SVDCache, storage: str):
        self.model, self.family, self.svd, self.storage = model, family, svd, storage
        self._auto: dict[tuple[int, str, int | None], AutoRank] = {}

    def name(self, layer: int, alias: str) -> str:
        return module_name(self.model, self.family, layer, alias)

    def auto(self, layer: int, alias: str, expert: int | None = None) -> AutoRank:
        """``rank: auto`` of a site's matrix (expert 0's for an MoE alias, or ``expert``'s), from the same full
        decomposition every ρ uses (exact SVD), else from its exact singular values."""
        if (layer, alias, expert) not in self._auto:
            if expert is None:
                dec = self.decomposition(layer, alias)
                t = self.targets(0, layer, alias)[0]
            else:
                t = self.targets(0, layer, alias, expert=expert)[0]
                name, w = target_matrix(self.model, self.family, t)
                dec = self.svd.get(name, w, min(w.shape))
            S = dec.S if dec.exact and dec.components == min(dec.shape) else singular_values(
                target_matrix(self.model, self.family, t)[1])
            self._auto[(layer, alias, expert)] = auto_rank(S, dec.shape)
        return self._auto[(layer, alias, expert)]

    def targets(self, index: int, layer: int, alias: str, rho: float | str | None = None,
                expert: int | None = None) -> list[Target]:
        """The matrices of one site: one, or one per expert of an MoE alias (all experts together, or only
        ``expert``); ``rho`` AUTO keeps the auto rank."""
        n = num_experts(self.family, alias, self.model.config)
        experts = [None] if n is None else ([expert] if expert is not None else range(n))
        if rho == AUTO:
            found = self.auto(layer, alias, expert)
            return [Target(index, layer, alias, None, found.rank, expert=e, auto=found) for e in experts]
        return [Target(index, layer, alias, rho, expert=e) for e in experts]

    def experts(self, alias: str) -> list[int | None]:
        """--per-expert: the experts of an MoE alias, each its own candidate ([None] for other aliases)."""
        n = num_experts(self.family, alias, self.model.config)
        return [None] if n is None else list(range(n))

    def decomposition(self, layer: int, alias: str):
        """The site's decomposition (for MoE: every expert's is computed and cached, expert 0's returned)."""
        decs = []
        for t in self.targets(0, layer, alias):
            name, w = target_matrix(self.model, self.family, t)
            decs.append(self.svd.get(name, w, min(w.shape)))
        return decs[0]

    def rank(self, c: Candidate) -> int:
        if c.rho == AUTO:
            return self.auto(c.layer, c.matrix, c.expert).rank
        return rank_for(c.rho, self.shape(c.layer, c.matrix))

    def ident(self, c: Candidate) -> str:
        """The candidate's exact id in the results log (:func:`~laser_export.search.grid.candidate_id`)."""
        return candidate_id(c, self.rank(c))

    def shape(self, layer: int, alias: str) -> tuple[int, int]:
        _, w = target_matrix(self.model, self.family, self.targets(0, layer, alias)[0])
        return int(w.shape[0]), int(w.shape[1])

    def apply(self, cands: Sequence[Candidate]) -> Callable[[], None]:
        """Reduce ``cands`` in the model; returns the undo. A full-rank candidate is the model itself
        (left unchanged)."""
        targets = [t for i, c in enumerate(cands) for t in self.targets(i, c.layer, c.matrix, c.rho, c.expert)]
        return intervene.apply(self.model, targets, family=self.family, storage=self.storage, cache=self.svd,
                               full_svd=True)


class LocalScorer:
    """Scores candidate sets on one in-process model: swap, replay from the prefix cache, undo.

    The unit of work of both the single-process sweep and each Ray actor.
    """

    def __init__(self, model, tokenizer, family: Family, examples: Sequence, *, batch_size: int = 32,
                 storage: str = "dense", svd: SVDCache | None = None, use_prefix_cache: bool = True,
                 cache_start: int | None = None, tasks: Sequence[tuple[str, int, float]] | None = None):
        self.tasks = tasks  # several benchmarks: see metrics_of
        self.model, self.tokenizer, self.family, self.examples = model, tokenizer, family, examples
        self.batch_size, self.use_prefix_cache = batch_size, use_prefix_cache
        self.swap = Swapper(model, family, svd if svd is not None else SVDCache(), storage)
        self.cache: PrefixCache | None = None
        self.cache_start = cache_start
        self.baseline_metrics: dict | None = None
        self.timings = {"capture_s": 0.0, "score_s": 0.0}
        self.n_scored = 0

    def _score(self, forward_fn=None):
        self.n_scored += 1
        t = time.perf_counter()
        r = evaluate.score_examples(self.model, self.tokenizer, self.examples, batch_size=self.batch_size,
                                    progress=False, forward_fn=forward_fn)
        self.timings["score_s"] += time.perf_counter() - t
        return r

    def _ensure_cache(self, start: int) -> PrefixCache | None:
        if not self.use_prefix_cache:
            return None
        if self.cache_start is not None:
            start = min(start, self.cache_start)
        if self.cache is None or self.cache.start > start:
            self.cache = PrefixCache(self.model, self.family, start, lazy_capture=True)
            t = time.perf_counter()
            r = self._score(self.cache.capture)
            self.timings["capture_s"] += time.perf_counter() - t
            self.baseline_metrics = self.baseline_metrics or metrics_of(r, self.tasks)
            if self.cache.exact is False:  # the capture ran full forwards; the recording is never replayed
                self.cache.batches = []
                from ..progress import console

                console.print(f"prefix cache: {self.cache.inexact_reason}")
        return self.cache

    def baseline(self) -> dict:
        if self.baseline_metrics is None:
            if self.use_prefix_cache:
                self._ensure_cache(self.cache_start if self.cache_start is not None else 0)
            else:
                self.baseline_metrics = metrics_of(self._score(), self.tasks)
        return self.baseline_metrics

    def baseline_result(self):
        """The unreduced model's ScoreResult: the capture pass of a fresh prefix cache (or a full pass)."""
        if not self.use_prefix_cache:
            r = self._score()
        else:
            self.cache = PrefixCache(self.model, self.family, self.cache_start or 0, lazy_capture=True)
            t = time.perf_counter()
            r = self._score(self.cache.capture)
            self.timings["capture_s"] += time.perf_counter() - t
            if self.cache.exact is False:  # the capture ran full forwards: never replayed (score_result)
                self.cache.batches = []
        self.baseline_metrics = metrics_of(r, self.tasks)
        return r

    def score_result(self, cands: Sequence[Candidate]):
        """The ScoreResult of ``cands`` swapped in together (replayed from the prefix cache), then undone."""
        start = min(c.layer for c in cands)
        pc = self._ensure_cache(start)
        if pc is not None and pc.exact is False:  # replay is not this model's forward: full forwards
            pc = None
        undo = self.swap.apply(cands)
        try:
            return self._score(pc.replay(start) if pc else None)
        finally:
            undo()

    def score_set(self, cands: Sequence[Candidate]) -> dict:
        return metrics_of(self.score_result(cands), self.tasks)

    def score_candidates(self, cands: Sequence[Candidate], baseline: dict) -> Iterator[tuple[Candidate, dict]]:
        for c in cands:
            shape = self.swap.shape(c.layer, c.matrix)
            yield c, (dict(baseline) if self.swap.rank(c) >= min(shape) else self.score_set([c]))


def _site_snr(swap: Swapper, layers, matrices, scan_snr: dict | None) -> list[dict]:
    """Data-free SNR per (layer, matrix): from a scan when given (no SVD here), else from the SVDs the sweep
    needs anyway."""
    rows = []
    for layer in layers:
        for alias in matrices:
            if scan_snr is not None:
                if (layer, alias) not in scan_snr:
                    raise RecipeError([f"--from-scan: the scan has no L{layer}.{alias}; scan those layers/matrices"])
                rows.append({"layer": layer, "matrix": alias, **scan_snr[(layer, alias)]})
            else:
                dec = swap.decomposition(layer, alias)
                rows.append({"layer": layer, "matrix": alias, **snr(dec.S, dec.shape)})
    return rows


def _site_order(snr_rows, layers, matrices, prune_snr, rank_by_snr) -> tuple[list, set]:
    """(every site by SNR descending, the sites swept in sweep order)."""
    sites = [(r["layer"], r["matrix"]) for r in sorted(snr_rows, key=lambda r: -r["snr"])]
    if prune_snr is not None:
        if not 0 < prune_snr <= 1:
            raise RecipeError([f"--prune-snr: a fraction in (0, 1], got {prune_snr}"])
        keep = set(sites[: max(1, math.ceil(prune_snr * len(sites)))])
    else:
        keep = set(sites)
    # latest layers first: the cheapest to score and the paper's usual winners, so a cut-short sweep
    # (resumable) has the most useful part done
    order = sites if rank_by_snr else [(l, a) for l in sorted(layers, reverse=True) for a in matrices]
    return sites, [s for s in order if s in keep]


def _grid_scores(scorer, swap: Swapper, grid, baseline, results: ResultsLog, progress: bool) -> dict:
    todo, queued = [], set()  # two ρ keeping the same rank: one measurement
    for c in grid:
        if results.get(swap.ident(c)) is None and swap.ident(c) not in queued:
            todo.append(c)
            queued.add(swap.ident(c))
    with progress_bar("search", enabled=progress, unit="candidates") as bar:
        task = bar.add_task("", total=len(grid), completed=len(grid) - len(todo))
        for c, metrics in scorer.score_candidates(todo, baseline):
            results.add(swap.ident(c), "candidate", metrics, layer=c.layer, matrix=c.matrix, rho=c.rho,
                        rank=swap.rank(c))
            bar.update(task, description=c.key)
            bar.advance(task)
    return {c: results.get(swap.ident(c))["metrics"] for c in grid}


def _halving_scores(local: LocalScorer, grid, results: ResultsLog, eta: int, seed: int, min_examples: int,
                    progress: bool):
    """(baseline metrics on every example, metrics per candidate at its last rung, baseline on the same
    examples per candidate, the halving result)."""
    from .halving import Scores, successive_halving

    def make(chunk):
        return LocalScorer(local.model, local.tokenizer, local.family, chunk, batch_size=local.batch_size,
                           storage=local.swap.storage, svd=local.swap.svd, use_prefix_cache=local.use_prefix_cache,
                           cache_start=local.cache_start)

    def identity(c):
        shape = local.swap.shape(c.layer, c.matrix)
        return local.swap.rank(c) >= min(shape)

    kept = [k for k in KEPT_METRICS if k != "n"]
    with progress_bar("halving", enabled=progress, unit="candidate scores") as bar:
        task = bar.add_task("", total=None)
        hv = successive_halving(local.examples, grid, make, kept_metrics=kept, results=results, eta=eta, seed=seed,
                                min_examples=min_examples, is_identity=identity,
                                on_scored=lambda c, i: (bar.update(task, description=f"rung {i} {c.key}"), bar.advance(task)))
    single = {c: hv.scores[c].metrics for c in grid}
    base_same = {c: Scores(hv.baseline.rows[: hv.scores[c].metrics["n"]]).metrics for c in grid}
    return hv.baseline.metrics, single, base_same, hv


def _halving_outcome(local: LocalScorer, grid, results: ResultsLog, eta: int, seed: int, min_examples: int,
                     progress: bool):
    """(baseline, metrics per candidate, its baseline on the same examples, survivors, the sweep JSON's
    ``halving`` section, per-candidate extra row fields, the halving result)."""
    baseline, single, base_same, hv = _halving_scores(local, grid, results, eta, seed, min_examples, progress)
    reached = {c: max(i for i, t in enumerate(hv.trace) if hv.scores[c].metrics["n"] >= t["examples"]) for c in grid}
    section = {"eta": eta, "seed": seed, "rungs": hv.trace, "scored_examples": hv.scored_examples,
               "grid_examples": len(local.examples) * (len(grid) + 1), "survivors": [c.key for c in hv.survivors]}
    return (baseline, single, base_same.__getitem__, hv.survivors, section, {c: {"rung": reached[c]} for c in grid},
            hv)


def _snr_report(snr_rows, sites, single, baseline_of, grid, best, keep_n) -> dict:
    gains = {}
    for c in grid:
        gains[c.site] = max(gains.get(c.site, -math.inf), single[c]["top1"] - baseline_of(c)["top1"])
    snr_of = {(r["layer"], r["matrix"]): r["snr"] for r in snr_rows}
    swept = [s for s in snr_of if s in gains]
    report = {
        "spearman_snr_vs_gain": spearman([snr_of[s] for s in swept], [gains[s] for s in swept]),
        "n_matrices": len(swept),
        "pruned_to": keep_n,
    }
    if best is not None:
        pos = sites.index(best.site) + 1
        report.update(winner=best.key, winner_snr_rank=pos, winner_snr_rank_of=len(sites),
                      winner_in_top_quarter_by_snr=pos <= max(1, math.ceil(len(sites) / 4)))
    return report


def _rows(grid, single, baseline_of, swap: Swapper, extra: dict | None = None) -> list[dict]:
    rows = []
    for c in grid:
        m, b = single[c], baseline_of(c)
        rows.append({
            **c.as_intervention(),
            "rho": c.rho,  # a number, or "auto"
            "rank": swap.rank(c),
            "metrics": m,
            "delta_top1": m["top1"] - b["top1"],
            **({"delta_logloss": m["logloss"] - b["logloss"]} if "logloss" in m and "logloss" in b else {}),
            **((extra or {}).get(c, {})),
        })
    return rows


def _compose(grid, single, baseline, candidates_ok, results: ResultsLog, scorer, swap: Swapper, compose,
             compose_tries, best, beam: int = 0):
    """Greedy composition of the helpful candidates (best ρ per matrix — per expert with --per-expert —
    best first)."""
    per_site: dict[tuple, Candidate] = {}
    for c in sorted(candidates_ok, key=lambda c: selection_key(single[c]), reverse=True):
        if single[c]["top1"] > baseline["top1"] and c.unit not in per_site:
            per_site[c.unit] = c
    ranked = list(per_site.values())

    def evaluate_set(cands: list[Candidate]) -> dict:
        ident = set_id([swap.ident(c) for c in cands])
        row = results.get(ident)
        if row is None:
            row = results.add(ident, "set", scorer.score_set(cands), interventions=[c.as_intervention() for c in cands])
        return row["metrics"]

    if ranked and beam:
        return compose_beam(ranked[: max(compose_tries, beam) + 1], evaluate_set, single, compose, beam)
    if ranked:
        return compose_greedy(ranked, evaluate_set, single, compose, compose_tries)
    # nothing beats the baseline on validation: report the best anyway, flagged by delta <= 0
    return ([best], single[best], []) if best else ([], {}, [])


def _check_run(layers, matrices, rhos, strategy: str, pool, tasks) -> None:
    if not layers or not matrices or not rhos:
        raise RecipeError(["search: the grid is empty (no layers, matrices or ρ)"])
    if strategy not in ("grid", "halving"):
        raise RecipeError([f"--strategy: grid or halving, got {strategy!r}"])
    if strategy == "halving" and pool is not None:
        raise RecipeError(["--strategy halving runs in this process: drop --ray"])
    if tasks and (strategy != "grid" or pool is not None):
        raise RecipeError(["--benchmark: several tasks are searched with --strategy grid, in this process (no --ray)"])


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
    pool=None,
    strategy: str = "grid",
    eta: int = 3,
    halving_seed: int = 0,
    halving_min_examples: int = 24,
    scan_snr: dict | None = None,
    tasks: Sequence[tuple[str, int, float]] | None = None,
    beam: int = 0,
    per_expert: bool = False,
) -> SearchResult:
    """Sweep ``layers × matrices × rhos`` on ``examples`` (the validation split) and compose.

    ``strategy``: ``grid`` scores every candidate on every example; ``halving`` runs successive halving
    (:mod:`.halving`, rate ``eta``, subsets drawn with ``halving_seed``) — in process only. ``scan_snr``:
    {(layer, matrix): snr row} from ``laser-export scan`` orders/prunes the sites instead of the SVDs.
    ``tasks``: several benchmarks in ``examples`` (see :func:`metrics_of`). ``beam``: compose by a beam
    search of that width (:func:`.compose.compose_beam`) instead of greedily. ``per_expert``: each expert of
    an MoE alias is its own candidate (default: the experts of a layer are reduced together).
    ``pool``: an object with ``baseline()``, ``score_candidates(cands, baseline)`` (yielding
    ``(candidate, metrics)`` as they finish) and ``score_set(cands)`` — e.g. a
    :class:`~laser_export.search.ray_pool.RayPool` — scores instead of this process; ``model`` is then
    only read (SVDs for the SNR ranking, shapes). Model weights are unchanged when this returns
    (every swap is undone, also on errors).
    """
    _check_run(layers, matrices, rhos, strategy, pool, tasks)
    results = results or ResultsLog(None, "ephemeral")
    svd = SVDCache() if svd is None else svd
    local = LocalScorer(model, tokenizer, family, examples, batch_size=batch_size, storage=storage, svd=svd,
                        use_prefix_cache=use_prefix_cache, cache_start=min(layers), tasks=tasks)
    scorer = pool if pool is not None else local
    swap = local.swap
    n_before = pool.n_scored if pool is not None else 0

    t0 = time.perf_counter()
    snr_rows = _site_snr(swap, layers, matrices, scan_snr)
    timings = {"svd_s": time.perf_counter() - t0, "capture_s": 0.0, "score_s": 0.0}
    sites, site_order = _site_order(snr_rows, layers, matrices, prune_snr, rank_by_snr or scan_snr is not None)
    grid = [Candidate(l, a, r, e) for (l, a) in site_order
            for e in (swap.experts(a) if per_expert else [None]) for r in rhos]

    if strategy == "grid":
        base_row = results.get("baseline") or results.add("baseline", "baseline", scorer.baseline())
        baseline = base_row["metrics"]
        single = _grid_scores(scorer, swap, grid, baseline, results, progress)
        baseline_of, finalists, halving, extra, hv = (lambda c: baseline), grid, None, {}, None
    else:
        baseline, single, baseline_of, finalists, halving, extra, hv = _halving_outcome(
            local, grid, results, eta, halving_seed, halving_min_examples, progress)
    best = max(finalists, key=lambda c: selection_key(single[c])) if finalists else None
    chosen, chosen_metrics, trace = _compose(grid, single, baseline, finalists, results, scorer, swap, compose,
                                             compose_tries, best, beam)
    report = _snr_report(snr_rows, sites, single, baseline_of, grid, best,
                         len(site_order) if prune_snr is not None else None)
    for k in ("capture_s", "score_s"):
        timings[k] = (pool.timings if pool is not None else local.timings).get(k, 0.0)
    # scoring passes run here (the halving's chunk scorers count their own)
    n_scored = (pool.n_scored - n_before) if pool is not None else local.n_scored + (hv.n_passes if hv else 0)
    return SearchResult(baseline=baseline, candidates=_rows(grid, single, baseline_of, swap, extra), best=best,
                        chosen=chosen, chosen_metrics=chosen_metrics, compose_trace=trace, snr=snr_rows,
                        snr_report=report, timings=timings, n_scored=n_scored, halving=halving)


def evaluate_recipe(
    model, tokenizer, family: Family, examples, chosen: Sequence[Candidate], *, batch_size: int = 32,
    storage: str = "dense", svd: SVDCache | None = None, progress: bool = True, use_prefix_cache: bool = True,
):
    """(baseline ScoreResult, reduced ScoreResult) on ``examples`` — verify's two passes
    (:class:`laser_export.verify.PairedPasses`: one full pass recording the prefix, one replay).

    What differs from ``verify``, on purpose: the chosen candidates are swapped in through the
    sweep's :class:`Swapper` (the same :func:`~laser_export.intervene.apply`, but from the search's
    SVD cache, full decompositions) and swapped out again afterwards, so the model is unchanged when
    this returns; there are no claims, baseline cache or perplexity here."""
    from ..verify import PairedPasses

    swap = Swapper(model, family, svd if svd is not None else SVDCache(), storage)
    passes = PairedPasses("causal", model, tokenizer, family, examples, start=min(c.layer for c in chosen),
                          batch_size=batch_size, progress=progress, prefix_cache=use_prefix_cache)
    base = passes.baseline("test: baseline")
    if passes.cache is not None and passes.cache.exact is False:  # replay is not the model's forward
        passes.forget_prefix()
    undo = swap.apply(chosen)
    try:
        red = passes.reduced("test: reduced")
    finally:
        undo()
    return base, red
