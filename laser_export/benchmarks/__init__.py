"""Benchmarks: loaders, a name → loader registry, and seeded held-out splits.

>>> from laser_export.benchmarks import load_examples, split_examples
>>> examples = load_examples("counterfact", "counterfact.json")          # doctest: +SKIP
>>> split = split_examples(examples, seed=0, validation_fraction=0.2)    # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from .. import metrics as _metrics
from . import bigbench, counterfact, jsonl, paper
from .base import (
    BenchmarkError,
    Example,
    Split,
    check_unique_ids,
    examples_sha256,
    split_examples,
)


#: Metrics of each kind of example (from the table in :mod:`laser_export.metrics`).
FIRST_TOKEN_METRICS = _metrics.FIRST_TOKEN
CHOICE_METRICS = _metrics.CHOICE
GENERATION_METRICS = _metrics.GENERATION


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: its loader, the scorers that can score it (a family must have one of them,
    see ``Family.scorers``) and the metrics a recipe's ``benchmark.metric`` may name."""

    name: str
    description: str
    loader: Callable[[str | os.PathLike | None], list[Example]]
    scorers: tuple[str, ...] = ("causal", "masked")
    metrics: tuple[str, ...] = FIRST_TOKEN_METRICS
    # the Hub dataset the examples correspond to (model card `model-index` dataset.type), its config, revision
    hub_dataset: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    #: the split(s) of that Hub dataset the examples are drawn from (model-index dataset.split); our own seeded
    #: validation/test split of them goes into dataset.args
    hub_split: str | None = None
    #: where the loader reads the examples (model-index dataset.args.examples_from)
    origin: str | None = None
    max_new_tokens: int = 15  # generation scorers: new tokens per answer


#: open-ended answers: first-token scoring, or generation (the paper's protocol for Llama-2 and WikidataQA)
_OPEN = dict(scorers=("causal", "masked", "generate", "masked_generate"),
             metrics=FIRST_TOKEN_METRICS + GENERATION_METRICS, max_new_tokens=10)


_CHOICE = dict(metrics=CHOICE_METRICS)

#: the BigBench JSON tasks are read from the sdist; tasksource/bigbench holds the same examples as train + validation
_BIGBENCH_ORIGIN = "bigbench==1.0.0 sdist (benchmark_tasks/*/task.json, every example)"

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "counterfact": BenchmarkSpec(
        "counterfact",
        "CounterFact true facts: rewrite prompt + 2 paraphrases per record, grouped by case_id",
        counterfact.load,
        hub_dataset="azhx/counterfact",  # the rome.baulab.info counterfact.json on the Hub
        **_OPEN,
        hub_split="train+test", origin="counterfact.json (rome.baulab.info) or its Hub copy azhx/counterfact (train + test by case_id)",
    ),
    "qa_wikidata": BenchmarkSpec(
        "qa_wikidata",
        "BigBench qa_wikidata (WikidataQA): complete a Wikidata fact; several accepted answers",
        partial(bigbench.load, "qa_wikidata"),
        hub_dataset="tasksource/bigbench",  # BIG-bench as the paper's code loads it
        hub_config="qa_wikidata",
        **_OPEN,
        hub_split="train+validation", origin=_BIGBENCH_ORIGIN,
    ),
    "epistemic_reasoning": BenchmarkSpec(
        "epistemic_reasoning",
        "BigBench epistemic_reasoning: entailment vs non-entailment",
        partial(bigbench.load, "epistemic_reasoning"),
        **_CHOICE,
        hub_dataset="tasksource/bigbench",  # BIG-bench as the paper's code loads it
        hub_config="epistemic_reasoning",
        hub_split="train+validation", origin=_BIGBENCH_ORIGIN,
    ),
    "fever": BenchmarkSpec(
        "fever",
        "BigBench fact_checker/fever: is the claim true or false",
        partial(bigbench.load, "fever"),
        **_CHOICE,
        hub_dataset="tasksource/bigbench",  # BIG-bench as the paper's code loads it
        hub_config="fact_checker",
        hub_split="train+validation", origin=_BIGBENCH_ORIGIN,
    ),
    "bios_gender": BenchmarkSpec(
        "bios_gender",
        "Bias in Bios (LabHC/bias_in_bios dev): male or female, compared at the next token / mask",
        paper.load_bios_gender,
        hub_dataset=paper.BIOS_REPO,
        hub_revision=paper.REVISIONS[paper.BIOS_REPO],
        **_CHOICE,
        hub_split="dev", origin="LabHC/bias_in_bios dev",
    ),
    "bios_profession": BenchmarkSpec(
        "bios_profession",
        "Bias in Bios (LabHC/bias_in_bios dev), the paper's 8 one-token professions",
        paper.load_bios_profession,
        hub_dataset=paper.BIOS_REPO,
        hub_revision=paper.REVISIONS[paper.BIOS_REPO],
        **_CHOICE,
        hub_split="dev", origin="LabHC/bias_in_bios dev",
    ),
    "truthfulqa": BenchmarkSpec(
        "truthfulqa",
        "TruthfulQA multiple_choice validation, every mc2 answer as a true/false statement",
        paper.load_truthfulqa,
        hub_dataset=paper.TRUTHFULQA_REPO,
        hub_config="multiple_choice",
        hub_revision=paper.REVISIONS[paper.TRUTHFULQA_REPO],
        **_CHOICE,
        hub_split="validation", origin="truthfulqa/truthful_qa multiple_choice validation",
    ),
    "fever_paper": BenchmarkSpec(
        "fever_paper",
        "FEVER v1.0 (EleutherAI/fever) paper_dev + paper_test, deduplicated claims: true or false",
        paper.load_fever_paper,
        hub_dataset=paper.FEVER_REPO,
        hub_config="v1.0",
        hub_revision=paper.REVISIONS[paper.FEVER_REPO],
        **_CHOICE,
        hub_split="paper_dev+paper_test", origin="EleutherAI/fever v1.0 paper_dev + paper_test",
    ),
    "causal_judgement": BenchmarkSpec(
        "causal_judgement",
        "BigBench causal_judgment (tasksource/bigbench validation + train): Yes or No",
        paper.load_causal_judgement,
        hub_dataset="tasksource/bigbench",
        hub_config="causal_judgment",
        hub_revision=paper.REVISIONS["tasksource/bigbench"],
        **_CHOICE,
        hub_split="validation+train", origin="tasksource/bigbench causal_judgment validation + train",
    ),
    "web_of_lies": BenchmarkSpec(
        "web_of_lies",
        "BigBench-Hard web_of_lies (lighteval/big_bench_hard): Yes or No",
        paper.load_web_of_lies,
        hub_dataset="lighteval/big_bench_hard",
        hub_config="web_of_lies",
        hub_revision=paper.REVISIONS["lighteval/big_bench_hard"],
        **_CHOICE,
        hub_split="train", origin="lighteval/big_bench_hard web_of_lies",
    ),
    "hotpot_qa": BenchmarkSpec(
        "hotpot_qa",
        "HotpotQA fullwiki (train head + validation, answers <= 15 words): greedy generation",
        paper.load_hotpot_qa,
        hub_dataset=paper.HOTPOT_REPO,
        hub_config="fullwiki",
        hub_revision=paper.REVISIONS[paper.HOTPOT_REPO],
        scorers=("generate", "masked_generate"),
        metrics=GENERATION_METRICS,
        hub_split="validation+train", origin="hotpotqa/hotpot_qa fullwiki validation + head of train",
    ),
    "jsonl": BenchmarkSpec(
        "jsonl",
        "your own examples, one JSON object per line (path required)",
        jsonl.load,
        metrics=FIRST_TOKEN_METRICS + ("accuracy",),
    ),
}


def load_examples(
    name: str, path: str | os.PathLike | None = None, max_examples: int | None = None
) -> list[Example]:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS`).

    ``path`` overrides where the data is read from (file, or URL for CounterFact). ``max_examples``
    keeps the first N examples in file order (before any split). Raises :class:`BenchmarkError`.
    """
    spec = BENCHMARKS.get(name)
    if spec is None:
        raise BenchmarkError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
        raise BenchmarkError(f"{name}: max_examples must be a positive integer, got {max_examples!r}")
    try:
        examples = spec.loader(path)
    except BenchmarkError:
        raise
    except RecursionError:
        raise BenchmarkError(f"{name}: {path or 'the default file'}: data nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{name}: {path or 'the default file'}: not UTF-8 text (byte {exc.start})") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        # a record of the wrong type (a number where a string or list belongs, ...) in a loader
        raise BenchmarkError(
            f"{name}: {path or 'the default file'}: a record has a field of the wrong type "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    except OSError as exc:
        raise BenchmarkError(f"{name}: cannot read {path or 'the default file'}: {exc.strerror or exc}") from None
    _check_lengths(examples, name, path)
    blank = next((ex for ex in examples if not ex.prompt.strip() or not all(a.strip() for a in ex.answers)), None)
    if blank is not None:
        raise BenchmarkError(f"{name}: example {blank.id!r} has an empty (whitespace-only) prompt or answer")
    if not examples:
        raise BenchmarkError(f"{name}: no examples loaded from {path or 'the default location'}")
    _check_choices(examples, name, path)
    check_unique_ids(examples, name)
    if max_examples is not None:
        examples = examples[:max_examples]
    return examples


#: The longest prompt/answer/choice text (characters): far beyond any model's context, short enough that
#: a tokenizer never allocates gigabytes for it (a 1 GiB prompt line aborted inside the tokenizer).
MAX_TEXT_CHARS = 1_000_000


def _check_lengths(examples: Sequence[Example], name: str, path) -> None:
    for ex in examples:
        for what, text in (("prompt", ex.prompt), *(("answer/choice", a) for a in (ex.choices or ex.answers))):
            if len(text) > MAX_TEXT_CHARS:
                raise BenchmarkError(
                    f"{name}: {path or 'the default file'}: example {ex.id!r}: {what} is {len(text):,} characters "
                    f"(limit {MAX_TEXT_CHARS:,}; no model here has a context that long)"
                )


def _check_choices(examples: Sequence[Example], name: str, path) -> None:
    """A choice example needs two or more distinct choices: with one, any model scores 100%; with duplicates,
    the copies tie and the label can never win (0% for any model)."""
    for ex in examples:
        if not ex.is_choice:
            continue
        where = f"{name}: {path or 'the default file'}: example {ex.id!r}"
        if len(ex.choices) < 2:
            raise BenchmarkError(f"{where} has {len(ex.choices)} choice; a choice task needs at least 2 "
                                 "(any model would score 100%)")
        dup = sorted({c for c in ex.choices if list(ex.choices).count(c) > 1})
        if dup:
            raise BenchmarkError(f"{where} lists the choice {dup[0]!r} more than once (the copies tie: the label "
                                 "could never be predicted)")


def subsample_examples(examples: Sequence[Example], n: int, seed: int | None) -> list[Example]:
    """``n`` examples drawn as whole groups, at random with ``random.Random(seed)`` (the first ``n``
    in file order when ``seed`` is None); the chosen examples keep their file order."""
    if n >= len(examples):
        return list(examples)
    groups = list(dict.fromkeys(ex.split_group for ex in examples))
    if seed is not None:
        random.Random(f"subsample-{seed}").shuffle(groups)
    sizes = Counter(ex.split_group for ex in examples)
    chosen, total = set(), 0
    for g in groups:
        if total >= n:
            break
        chosen.add(g)
        total += sizes[g]
    return [ex for ex in examples if ex.split_group in chosen]


def load_split(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    seed: int | None = 0,
    validation_fraction: float = 0.2,
    subsample: int | None = None,
) -> Split:
    """Load a benchmark, optionally subsample it (seeded, whole groups), and split it."""
    examples = load_examples(name, path)
    if subsample is not None:
        examples = subsample_examples(examples, subsample, seed)
    return split_examples(examples, seed=seed, validation_fraction=validation_fraction)


__all__ = [
    "CHOICE_METRICS",
    "FIRST_TOKEN_METRICS",
    "GENERATION_METRICS",
    "load_split",
    "subsample_examples",
    "BENCHMARKS",
    "BenchmarkError",
    "BenchmarkSpec",
    "Example",
    "Split",
    "examples_sha256",
    "load_examples",
    "split_examples",
]
