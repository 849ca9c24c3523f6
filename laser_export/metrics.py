"""The one table of metrics: what each is, which scorer computes it, how it reads and is shown.

Every other list of metric names is derived from :data:`METRICS` (the scorers' means, the metrics a
benchmark's ``benchmark.metric`` may name, what verify reports, what search keeps, the model card's
labels, verify's table formatting). The table's order is the order they are reported in.

``kind`` says which examples have the metric: ``first_token`` (open-ended answers scored at the next
token / the mask), ``choice`` (multiple choice) or ``generation`` (generated text). ``scorers`` are
the scorers of :data:`laser_export.selection.SCORERS` that compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the single-position scorers (one forward per row, read at one position) and the generating ones
POSITION_SCORERS = ("causal", "masked")
GENERATION_SCORERS = ("generate", "masked_generate")


@dataclass(frozen=True)
class Metric:
    name: str
    kinds: tuple[str, ...]  # first_token | choice | generation: the examples that have it
    scorers: tuple[str, ...]  # the scorers that compute it
    higher_is_better: bool = True
    rate: bool = True  # a fraction of examples (shown as a percentage); else a mean value (log-prob, log-loss)
    label: str | None = None  # the model card's wording (None: the card shows the name)
    search: bool = True  # kept by the search (sweep rows, test summary)

    def format(self, value: float) -> str:
        """How verify's table shows a value: a rate as a percentage, anything else with 4 decimals."""
        return f"{100 * value:.2f}%" if self.rate else f"{value:.4f}"


_ONE = POSITION_SCORERS
_GEN = GENERATION_SCORERS

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("top1", ("first_token", "choice"), _ONE, label="top-1 accuracy"),
    Metric("top1_no_article", ("first_token",), _ONE, label="top-1 accuracy, leading articles excluded"),
    Metric("top5", ("first_token",), _ONE, label="top-5 accuracy"),
    Metric("top10", ("first_token",), _ONE, label="top-10 accuracy"),
    Metric("accuracy", ("choice",), _ONE, label="accuracy"),
    Metric("exact_match", ("generation",), _GEN, search=False),
    Metric("contains", ("generation",), _GEN, search=False),
    Metric("f1", ("generation",), _GEN, search=False),
    Metric("logprob", ("first_token",), _ONE, rate=False, label="answer log-prob (higher is better)"),
    Metric("logloss", ("first_token",), _ONE, higher_is_better=False, rate=False, label="log-loss (lower is better)"),
)}


def names(*, kind: str | None = None, scorer: str | None = None, search: bool | None = None) -> tuple[str, ...]:
    """Metric names in table order, optionally only those of a ``kind``, computed by ``scorer``, or
    kept by the search."""
    return tuple(m.name for m in METRICS.values()
                 if (kind is None or kind in m.kinds) and (scorer is None or scorer in m.scorers)
                 and (search is None or m.search == search))


def format_value(name: str, value: float) -> str:
    """A metric value as verify's table shows it (an unknown name: as a rate)."""
    return METRICS.get(name, Metric(name, (), ())).format(value)


#: every metric, in report order (what verify reports and bootstraps)
ALL = names()
#: metrics of open-ended answers scored at one position (next token / mask)
FIRST_TOKEN = names(kind="first_token")
#: metrics of multiple-choice examples
CHOICE = names(kind="choice")
#: metrics of generated text
GENERATION = names(kind="generation")
#: what the search keeps of a ScoreResult (plus the example count ``n``)
SEARCH_KEPT = names(search=True) + ("n",)
#: the model card's wording
LABELS = {m.name: m.label for m in METRICS.values() if m.label is not None}
