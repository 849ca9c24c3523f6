"""Selection (validation top-1, ties by mean answer log-prob) and greedy composition of candidates."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from .grid import Candidate

SELECTION_METRICS = ("top1", "logprob")  # lexicographic: accuracy, then mean answer log-prob


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
        if any(c.unit == cand.unit for c in kept):
            continue
        tries += 1
        trial = kept + [cand]
        metrics = evaluate_set(trial)
        better = metrics["top1"] > current["top1"]
        trace.append({"set": [c.key for c in trial], "top1": metrics["top1"], "kept": better})
        if better:
            kept, current = trial, metrics
    return kept, current, trace


def compose_beam(
    ranked: Sequence[Candidate],
    evaluate_set: Callable[[list[Candidate]], dict],
    single: dict[Candidate, dict],
    max_interventions: int,
    width: int,
) -> tuple[list[Candidate], dict, list[dict]]:
    """Beam search over stacks: keep the ``width`` best sets of each size (by the selection key), extend
    each by every other helpful candidate at a new site, and stop at ``max_interventions`` or when no set of
    the next size beats the best so far. ``width=1`` is greedy over all extensions (not only the next in
    rank). Returns (best set, its metrics, trace)."""
    if not ranked:
        return [], {}, []
    beam = [([c], single[c]) for c in sorted(ranked, key=lambda c: selection_key(single[c]), reverse=True)[:width]]
    best, best_m = beam[0]
    trace: list[dict] = []
    seen = {tuple(sorted(c.key for c in s)) for s, _ in beam}
    for _ in range(1, max_interventions):
        grown = []
        for kept, _m in beam:
            for cand in ranked:
                if any(c.unit == cand.unit for c in kept):
                    continue
                trial = kept + [cand]
                ident = tuple(sorted(c.key for c in trial))
                if ident in seen:
                    continue
                seen.add(ident)
                metrics = evaluate_set(trial)
                trace.append({"set": [c.key for c in trial], "top1": metrics["top1"]})
                grown.append((trial, metrics))
        if not grown:
            break
        grown.sort(key=lambda sm: selection_key(sm[1]), reverse=True)
        beam = grown[:width]
        if selection_key(beam[0][1]) <= selection_key(best_m):
            break
        best, best_m = beam[0]
    return best, best_m, trace
