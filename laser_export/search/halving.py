"""Successive halving over validation examples (``search --strategy halving``).

Every candidate is scored on a small random part of the validation split; the best ``1/eta`` of them
(by the selection key: top-1, ties by mean answer log-prob) go on to a part ``eta`` times larger, and so
on until the survivors have been scored on every validation example. Parts are nested: rung ``i`` scores
only the examples it adds (a *chunk*), and a candidate's metrics at a rung are the means over every chunk
it has been scored on. What stays the same as the grid:

* the same swap + exact undo and the same :class:`~laser_export.intervene.SVDCache` (one SVD per matrix);
* prefix replay: each chunk has its own :class:`~laser_export.search.sweep.LocalScorer` whose capture pass
  is the chunk's baseline, so the chunks' baselines add up to one baseline pass over the validation split;
* the resumable log: each (chunk, candidate) score is one row, with its per-example values, keyed by the
  chunk's examples, so an interrupted halving resumes where it stopped.

Noise: at the last cut (the one before the full split) a candidate is never dropped while the paired
bootstrap 95% CI of its top-1 difference to the leader (on the examples scored so far) includes 0; it goes
on to the full split with the leader. Earlier cuts are by rank only.

The schedule (:func:`plan`) is chosen so that this rule cannot break the cost bound: its *worst case* —
the CI rule keeping every candidate alive at the last cut — scores at most ``BUDGET`` (35%) of the grid's
example scorings (``n × (candidates + 1)``, baseline included). Rung ``i`` (all but the last) holds
``first · eta^i`` examples, the last all ``n``; each cut keeps the best ``1/eta`` (successive halving,
Karnin et al. 2013, Jamieson & Talwalkar 2016, is ``eta = 2``; Hyperband, Li et al. 2018, uses 3). The plan
spends what the budget allows on evidence before each drop: the gentlest rate (smallest ``eta``, from 2, unless
``eta`` is given) for which some schedule fits, and for it the number of rungs and the largest first part (at
least ``min_examples``) whose worst case fits (:func:`schedule_cost` counts it exactly). For 36 candidates
at ``n = 384`` that is eta 2 on 47 → 94 → 188 → 376 → 384 examples for 36 → 18 → 9 → 5 → 3 to 5 candidates,
worst case 0.334 (eta 3 would be 42 → 126 → 378 → 384, 0.277: it drops two thirds at each cut on fewer
examples). At eta 3 one rank cut never fits 36 candidates (36 → 12, then 12 kept by the CI rule on the rest:
with the baseline already 13/37 = 0.351 of the grid), which is what the former schedule (``n / eta^(K-1-i)``,
eta 3, three rungs below ``n = 648``) did: up to 0.42. When no schedule fits (too few examples or
candidates), the valid one with the smallest worst case is run and ``within_budget`` says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .. import stats
from ..benchmarks import examples_sha256
from .compose import selection_key
from .grid import Candidate
from .results import ResultsLog

#: the largest share of the grid's example scorings a halving may spend in its worst case
BUDGET = 0.35
#: the rates the plan tries, gentlest first (2: keep the best half at each cut, successive *halving* proper)
ETAS = tuple(range(2, 9))
#: the smallest first part (examples every candidate is scored on before the first cut)
MIN_EXAMPLES = 24


def rung_sizes(n_examples: int, eta: int, rungs: int, first: int) -> list[int]:
    """Cumulative example counts of ``rungs`` rungs: ``first · eta^i`` for all but the last, then ``n``."""
    if eta < 2:
        raise ValueError(f"eta must be at least 2, got {eta}")
    if rungs < 1:
        raise ValueError(f"rungs must be at least 1, got {rungs}")
    return [first * eta**i for i in range(rungs - 1)] + [n_examples]


def schedule_cost(n_examples: int, n_candidates: int, eta: int, sizes: Sequence[int], *, ci_keeps_all: bool) -> int:
    """Example scorings of a halving with these rungs (the chunk baselines, ``n`` in all, included): the
    rank cuts keep ``ceil(alive / eta)``; at the last cut the CI rule keeps every candidate
    (``ci_keeps_all``, the worst case) or none beyond the rank cut (the best case)."""
    total, alive, lo = n_examples, n_candidates, 0
    for i, hi in enumerate(sizes):
        total += alive * (hi - lo)
        lo = hi
        if i < len(sizes) - 1 and not (ci_keeps_all and i == len(sizes) - 2):
            alive = max(1, math.ceil(alive / eta))
    return total


@dataclass(frozen=True)
class Schedule:
    """A halving plan: its rate, cumulative rung sizes and cost bounds (example scorings)."""

    n_examples: int
    n_candidates: int
    eta: int
    sizes: tuple[int, ...]
    budget: float = BUDGET

    @property
    def grid(self) -> int:
        return self.n_examples * (self.n_candidates + 1)

    @property
    def worst(self) -> int:
        return schedule_cost(self.n_examples, self.n_candidates, self.eta, self.sizes, ci_keeps_all=True)

    @property
    def best(self) -> int:
        return schedule_cost(self.n_examples, self.n_candidates, self.eta, self.sizes, ci_keeps_all=False)

    @property
    def within_budget(self) -> bool:
        return self.worst <= self.budget * self.grid

    def as_dict(self) -> dict:
        return {"eta": self.eta, "sizes": list(self.sizes), "budget": self.budget,
                "worst_case_ratio": self.worst / self.grid, "best_case_ratio": self.best / self.grid,
                "within_budget": self.within_budget}


def _valid(sizes: Sequence[int], n_candidates: int, eta: int, min_examples: int) -> bool:
    """Rungs that strictly grow, a first part of at least ``min_examples`` and two or more candidates at
    every cut (the single rung, the grid itself, is always valid)."""
    if len(sizes) == 1:
        return True
    alive = n_candidates
    for _ in sizes[:-1]:
        if alive < 2:
            return False
        alive = math.ceil(alive / eta)
    return sizes[0] >= min_examples and all(a < b for a, b in zip(sizes, sizes[1:]))


def _largest_first(n: int, c: int, eta: int, rungs: int, min_examples: int, budget: float) -> Schedule | None:
    """The schedule of ``rungs`` rungs at rate ``eta`` with the largest first part whose worst case fits the
    budget (the worst case grows with the first part: bisection); None when even ``min_examples`` is over it
    or leaves no valid schedule."""
    def make(first: int) -> Schedule:
        return Schedule(n, c, eta, tuple(rung_sizes(n, eta, rungs, first)), budget)

    lo, hi = min_examples, -(-n // eta ** (rungs - 2)) - 1  # the last cut before the full split
    if lo > hi or not _valid(make(lo).sizes, c, eta, min_examples) or not make(lo).within_budget:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if make(mid).within_budget else (lo, mid - 1)
    return make(lo)


def _plan_at(n: int, c: int, eta: int, min_examples: int, budget: float) -> tuple[Schedule | None, list[Schedule]]:
    """At rate ``eta``: (the schedule with the largest first part whose worst case fits the budget, or None;
    every valid schedule with a first part of ``min_examples``, the fallbacks)."""
    fits, fallback = [], [Schedule(n, c, eta, (n,), budget)]
    rungs = 3  # two rungs: the only cut is the last, where the CI rule may keep everyone (the grid's cost)
    while min_examples * eta ** (rungs - 2) < n:
        best = _largest_first(n, c, eta, rungs, min_examples, budget)
        fits += [best] if best else []
        sizes = rung_sizes(n, eta, rungs, min_examples)
        if _valid(sizes, c, eta, min_examples):
            fallback.append(Schedule(n, c, eta, tuple(sizes), budget))
        rungs += 1
    return (max(fits, key=lambda s: (s.sizes[0], -len(s.sizes))) if fits else None), fallback


def plan(n_examples: int, n_candidates: int, eta: int | None = None, *, min_examples: int = MIN_EXAMPLES,
         budget: float = BUDGET) -> Schedule:
    """The halving schedule (module docstring): at ``eta``, or at the smallest rate of :data:`ETAS` with a
    schedule within the budget; else the valid schedule with the smallest worst case."""
    fallback = []
    for e in [eta] if eta is not None else ETAS:
        best, more = _plan_at(n_examples, n_candidates, e, min_examples, budget)
        if best is not None:
            return best
        fallback += more
    return min(fallback, key=lambda s: (s.worst, -s.sizes[0], s.eta, len(s.sizes)))


@dataclass
class Scores:
    """A candidate's (or the baseline's) per-example values over the chunks scored so far."""

    rows: list[dict] = field(default_factory=list)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    @property
    def metrics(self) -> dict:
        keys = dict.fromkeys(k for r in self.rows for k in r)
        out = {k: sum(float(r[k]) for r in self.rows if k in r) / max(1, sum(1 for r in self.rows if k in r))
               for k in keys}
        out["n"] = len(self.rows)
        return out

    def values(self, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.rows if metric in r]


@dataclass
class HalvingResult:
    baseline: Scores
    scores: dict[Candidate, Scores]
    survivors: list[Candidate]
    trace: list[dict]
    scored_examples: int  # examples scored (chunk baselines + candidates), resumed rows included
    n_passes: int = 0  # scoring passes actually run (not resumed)
    schedule: Schedule | None = None


def _per_example(result, kept: Sequence[str]) -> list[dict]:
    return [{k: (float(v) if not isinstance(v, bool) else v) for k, v in row.items() if k in kept}
            for row in result.per_example]


def _cut(ranked: list[Candidate], scores: dict[Candidate, Scores], keep: int, last_cut: bool) -> tuple[list, list]:
    """(kept, kept only because their paired CI includes the leader's value)."""
    kept = ranked[:keep]
    if not last_cut or not ranked:
        return kept, []
    leader = scores[ranked[0]].values("top1")
    extra = []
    for c in ranked[keep:]:
        ci = stats.paired_bootstrap(leader, scores[c].values("top1"), seed=0)["ci95"]
        if ci[1] >= 0:  # not shown worse than the leader
            extra.append(c)
    return kept + extra, extra


def successive_halving(
    examples: Sequence,
    candidates: Sequence[Candidate],
    make_scorer: Callable[[Sequence], object],
    *,
    kept_metrics: Sequence[str],
    results: ResultsLog,
    eta: int | None = None,
    seed: int = 0,
    min_examples: int = MIN_EXAMPLES,
    budget: float = BUDGET,
    is_identity: Callable[[Candidate], bool] = lambda c: False,
    on_scored: Callable[[Candidate, int], None] | None = None,
) -> HalvingResult:
    """Run the rungs. ``make_scorer(chunk)`` returns an object with ``baseline_result()`` and
    ``score_result(cands)`` (ScoreResults) on ``chunk``; ``is_identity(c)``: the candidate is the model
    itself (full rank), scored as the baseline without a pass. The rungs: :func:`plan` (``eta`` None: the
    gentlest rate within the budget); the example subsets are drawn with ``seed``."""
    order = list(range(len(examples)))
    random.Random(f"halving-{seed}").shuffle(order)
    schedule = plan(len(examples), len(candidates), eta, min_examples=min_examples, budget=budget)
    sizes, eta = schedule.sizes, schedule.eta
    base, scores = Scores(), {c: Scores() for c in candidates}
    alive, trace, scored, lo, passes = list(candidates), [], 0, 0, 0
    for i, hi in enumerate(sizes):
        chunk = [examples[j] for j in order[lo:hi]]
        tag = f"halving:{examples_sha256(chunk)[:12]}"
        scorer = None

        def cached(ident: str, compute):
            nonlocal scorer
            row = results.get(ident)
            if row is None:
                scorer = scorer or make_scorer(chunk)
                row = results.add(ident, "halving", {}, per_example=_per_example(compute(scorer), kept_metrics))
            return row["per_example"]

        base_rows = cached(f"{tag}:baseline", lambda s: s.baseline_result())
        base.add(base_rows)
        scored += len(chunk)
        for c in alive:
            rows = base_rows if is_identity(c) else cached(f"{tag}:{c.key}", lambda s, c=c: s.score_result([c]))
            scores[c].add(rows)
            scored += 0 if is_identity(c) else len(chunk)
            if on_scored:
                on_scored(c, i)
        ranked = sorted(alive, key=lambda c: selection_key(scores[c].metrics), reverse=True)
        entry = {"rung": i, "examples": hi, "chunk": len(chunk), "candidates": len(alive),
                 "leader": ranked[0].key if ranked else None}
        if i < len(sizes) - 1:
            keep = max(1, math.ceil(len(alive) / eta))
            alive, extra = _cut(ranked, scores, keep, last_cut=i == len(sizes) - 2)
            entry.update(kept=len(alive), kept_by_ci=[c.key for c in extra])
        trace.append(entry)
        passes += scorer.n_scored if scorer is not None else 0
        lo = hi
    return HalvingResult(base, scores, alive, trace, scored, passes, schedule)


@dataclass
class _Rows:
    per_example: list[dict]


class TableScorer:
    """A halving scorer that reads per-example values already measured on every example (e.g. a grid's):
    ``table[None]`` the baseline's rows, ``table[candidate]`` a candidate's, in ``examples`` order. Replaying
    a halving from a grid this way scores nothing: the bench uses it to draw many subsets (seeds) at no
    model cost, and :func:`successive_halving` runs unchanged on it."""

    def __init__(self, examples: Sequence, table: dict, chunk: Sequence | None = None):
        self.examples, self.table, self.n_scored = examples, table, 0
        index = {id(ex): i for i, ex in enumerate(examples)}
        self.rows = [index[id(ex)] for ex in (examples if chunk is None else chunk)]

    def chunk(self, chunk: Sequence) -> "TableScorer":
        return TableScorer(self.examples, self.table, chunk)

    def _take(self, key) -> _Rows:
        self.n_scored += 1
        return _Rows([self.table[key][i] for i in self.rows])

    def baseline_result(self) -> _Rows:
        return self._take(None)

    def score_result(self, cands: Sequence[Candidate]) -> _Rows:
        (c,) = cands
        return self._take(c)
