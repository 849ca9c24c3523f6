"""Which scorer measures a benchmark for a family (:func:`scorer_for`), and :func:`score` by scorer name."""

from __future__ import annotations

from typing import Sequence

from . import metrics as _metrics
from .benchmarks.base import Example
from .evaluate import (
    GENERATION_SCORERS,
    ScoreResult,
    score_examples,
    score_generate,
    score_masked,
    score_masked_generate,
)

#: Scorer name (the names used in ``Family.scorers`` / ``BenchmarkSpec.scorers``) -> function.
SCORERS = {
    "causal": score_examples,
    "masked": score_masked,
    "generate": score_generate,
    "masked_generate": score_masked_generate,
}


def scorer_for(family, spec, metric: str | None = None) -> str:
    """The scorer for a family (``Family.scorers``, in its order of preference) on a benchmark
    (``BenchmarkSpec.scorers``); with ``metric``, one that computes it (a generation metric needs a
    generation scorer). ValueError naming the recipe field when none applies (``check`` reports it)."""
    pair = [s for s in family.scorers if s in spec.scorers]
    if not pair:
        raise ValueError(
            f"benchmark.name: {spec.name} is scored by the {' or '.join(spec.scorers)} scorer; "
            f"{family.name} has only {', '.join(family.scorers)}"
        )
    if metric is not None:
        known = _metrics.METRICS.get(metric)
        wants_generation = known is not None and "generation" in known.kinds
        fit = [s for s in pair if s in known.scorers] if known else [s for s in pair if s not in GENERATION_SCORERS]
        if not fit:
            kind = "a generation" if wants_generation else "a single-position"
            raise ValueError(
                f"benchmark.metric: {metric} needs {kind} scorer; {family.name} scores {spec.name} with "
                f"{', '.join(pair)}"
            )
        return fit[0]
    return pair[0]


def score(scorer: str, model, tokenizer, examples: Sequence[Example], **options) -> ScoreResult:
    """Score with the named scorer (see :data:`SCORERS`)."""
    try:
        fn = SCORERS[scorer]
    except KeyError:
        raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}") from None
    return fn(model, tokenizer, examples, **options)
