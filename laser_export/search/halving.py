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
on to the full split with the leader.
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


def rung_sizes(n_examples: int, n_candidates: int, eta: int = 3, min_examples: int = 24) -> list[int]:
    """Cumulative example counts per rung, the last one ``n_examples``: each rung ``eta`` times the one
    before; as many rungs as keep the first one at least ``min_examples`` and leave a candidate to cut."""
    if eta < 2:
        raise ValueError(f"eta must be at least 2, got {eta}")
    rungs = 1
    while (n_examples / eta ** rungs >= min_examples) and (n_candidates / eta ** rungs >= 1):
        rungs += 1
    return [max(1, round(n_examples / eta ** (rungs - 1 - i))) for i in range(rungs - 1)] + [n_examples]


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
    eta: int = 3,
    seed: int = 0,
    min_examples: int = 24,
    is_identity: Callable[[Candidate], bool] = lambda c: False,
    on_scored: Callable[[Candidate, int], None] | None = None,
) -> HalvingResult:
    """Run the rungs. ``make_scorer(chunk)`` returns an object with ``baseline_result()`` and
    ``score_result(cands)`` (ScoreResults) on ``chunk``; ``is_identity(c)``: the candidate is the model
    itself (full rank), scored as the baseline without a pass."""
    order = list(range(len(examples)))
    random.Random(f"halving-{seed}").shuffle(order)
    sizes = rung_sizes(len(examples), len(candidates), eta, min_examples)
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
    return HalvingResult(base, scores, alive, trace, scored, passes)
