"""Choice tasks: is an accuracy gain knowledge, or the model answering one class for everything?

On a binary task whose classes are unbalanced (BigBench epistemic_reasoning: 62% ``non-entailment``), a
reduction that makes the model answer the majority class for every example "gains" accuracy up to the
majority rate without telling anything apart. :func:`answer_balance` measures, for one scored split,
the *majority rate* (accuracy of always giving the most common correct answer) and how concentrated the
model's predictions are; :func:`collapse_warning` turns a reduced model that answers one class for
≥ :data:`COLLAPSE_SHARE` of the examples into a one-line warning, shown by ``verify`` and ``search``,
recorded in the verify report (``answer_balance``) and written into searched recipes' headers.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

#: a reduced model giving the same answer on at least this share of a choice task's examples "collapsed"
COLLAPSE_SHARE = 0.95


def answer_balance(examples: Sequence, per_example: Sequence[dict]) -> dict | None:
    """``{"n", "majority_answer", "majority_rate", "top_prediction", "top_prediction_share"}`` over the
    choice examples of a scored split (answers compared by their text), or None when there are none."""
    if len(examples) != len(per_example):  # per_example is in the examples' order (scorers and cache)
        return None
    pairs = [(ex.choices[ex.label], ex.choices[row["prediction"]])
             for ex, row in zip(examples, per_example) if ex.is_choice and "prediction" in row]
    if not pairs:
        return None
    n = len(pairs)
    (majority, m_count), = Counter(gold for gold, _ in pairs).most_common(1)
    (top, t_count), = Counter(pred for _, pred in pairs).most_common(1)
    return {"n": n, "majority_answer": majority, "majority_rate": m_count / n,
            "top_prediction": top, "top_prediction_share": t_count / n}


def paired(examples: Sequence, base, red) -> dict | None:
    """``{"baseline": ..., "reduced": ...}`` answer balance of two ScoreResults on the same ``examples``
    (verify's report, search's test summary), or None when the task has no choice examples."""
    pair = {"baseline": answer_balance(examples, base.per_example), "reduced": answer_balance(examples, red.per_example)}
    return pair if pair["baseline"] is not None else None


def side_warning(pair: dict | None, side: str, accuracy: float | None = None) -> str | None:
    """:func:`collapse_warning` for one side of a :func:`paired` record (a report's ``answer_balance``)."""
    return collapse_warning((pair or {}).get(side), accuracy)


def collapse_warning(balance: dict | None, accuracy: float | None = None) -> str | None:
    """A one-line warning when the model answers one class for ≥ COLLAPSE_SHARE of the examples."""
    if not balance or balance["top_prediction_share"] < COLLAPSE_SHARE:
        return None
    acc = "" if accuracy is None else f"; its accuracy {accuracy:.2%} vs"
    return (f"the model answers {balance['top_prediction']!r} for {balance['top_prediction_share']:.1%} of the "
            f"{balance['n']} examples{acc} the majority-class rate {balance['majority_rate']:.2%} "
            f"(always {balance['majority_answer']!r}): an accuracy gain here is a collapse to one answer, "
            "not knowledge")
