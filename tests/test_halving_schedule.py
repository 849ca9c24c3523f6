"""The halving schedule (:func:`laser_export.search.halving.plan`): geometric rungs, a worst case (the CI rule
keeping every candidate at the last cut) within 35% of the grid's example scorings for grids of 36 or more
candidates once n >= 16 x the first part, and the CI rule at the last cut on fake per-example scores."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from laser_export import stats
from laser_export.search import Candidate, ResultsLog
from laser_export.search.halving import (BUDGET, Schedule, TableScorer, plan, rung_sizes, schedule_cost,
                                         successive_halving)


@dataclass(frozen=True)
class Ex:
    i: int

    def to_json(self) -> dict:
        return {"i": self.i}


def _grid(n_layers=3, n_matrices=3, n_rhos=4):
    mats = ["fc_in", "fc_up", "fc_out"][:n_matrices]
    return [Candidate(l, m, r) for l in range(n_layers) for m in mats for r in (0.01, 0.05, 0.1, 0.25)[:n_rhos]]


def test_rung_sizes_are_geometric():
    assert rung_sizes(384, 3, 4, 42) == [42, 126, 378, 384]
    assert rung_sizes(60, 3, 1, 24) == [60]
    with pytest.raises(ValueError):
        rung_sizes(10, 1, 2, 5)


def test_schedule_cost_by_hand():
    # 36 candidates, rungs 42/126/378/384 at eta 3: 36 → 12 → 4 → 2 (or 4 if the CI rule keeps all)
    sizes = (42, 126, 378, 384)
    best = 384 + 36 * 42 + 12 * 84 + 4 * 252 + 2 * 6
    worst = 384 + 36 * 42 + 12 * 84 + 4 * 252 + 4 * 6
    assert schedule_cost(384, 36, 3, sizes, ci_keeps_all=False) == best
    assert schedule_cost(384, 36, 3, sizes, ci_keeps_all=True) == worst
    s = Schedule(384, 36, 3, sizes)
    assert s.grid == 384 * 37 and s.worst == worst and s.within_budget
    assert s.as_dict()["worst_case_ratio"] == pytest.approx(worst / (384 * 37))


def test_plan_for_the_36_candidate_grid():
    s = plan(384, 36)  # the gentlest rate that fits: halving proper
    assert (s.eta, s.sizes) == (2, (47, 94, 188, 376, 384))
    assert s.worst / s.grid <= BUDGET and s.within_budget
    # a first part as large as the budget or the rung order allows
    assert plan(384, 36, 3).sizes == (42, 126, 378, 384) and 42 * 9 < 384 <= 43 * 9
    assert plan(384, 36, 4).sizes == (41, 164, 384) and not Schedule(384, 36, 4, (42, 168, 384)).within_budget
    # the former schedule (n / eta^(K-1-i), eta 3, three rungs) could spend 42% of the grid when the CI rule
    # kept all 12 at the last cut; at eta 3 one rank cut never fits 36 candidates, whatever the first part
    old = Schedule(300, 36, 3, (33, 100, 300))
    assert old.worst / old.grid > BUDGET
    assert not Schedule(384, 36, 3, (24, 384)).within_budget and not Schedule(384, 36, 3, (24, 72, 384)).within_budget
    assert not plan(216, 36, 3).within_budget and plan(217, 36, 3).sizes == (24, 72, 216, 217)
    assert plan(192, 36).eta == 5  # eta 2 needs n > 8 x 24: the next rate that fits


@pytest.mark.parametrize("eta", [2, 3, 4])
@pytest.mark.parametrize("n_candidates", [36, 37, 48, 64, 100, 250])
@pytest.mark.parametrize("n", [384, 400, 512, 1000, 3000])
def test_plan_is_within_budget_structurally(n, n_candidates, eta):
    s = plan(n, n_candidates, eta)
    assert s.within_budget and s.worst <= BUDGET * s.grid and s.sizes[0] >= 24 and s.sizes[-1] == n
    assert all(a < b for a, b in zip(s.sizes, s.sizes[1:]))


def test_plan_when_the_budget_cannot_be_met():
    s = plan(216, 36, 3)  # four rungs at eta 3 need n > 9 x 24: the cheapest valid plan, flagged
    assert not s.within_budget and s.sizes == (24, 72, 216)
    assert not plan(100, 36).within_budget and plan(100, 36).sizes[0] >= 24
    assert plan(40, 6).sizes == (40,)  # too few examples for a cut: the grid itself
    assert plan(54, 12, 3, min_examples=6).sizes == (6, 18, 54)


def _table(examples, cands, rng, quality):
    """Per-example rows: candidate c hits with probability quality[c], logprob noise."""
    table = {None: [{"top1": rng.random() < 0.3, "logprob": -rng.random()} for _ in examples]}
    for c in cands:
        table[c] = [{"top1": rng.random() < quality[c], "logprob": -rng.random()} for _ in examples]
    return table


def _run(examples, cands, table, seed=0, **kw):
    scorer = TableScorer(examples, table)
    return successive_halving(examples, cands, scorer.chunk, kept_metrics=["top1", "logprob"],
                              results=ResultsLog(None, "t"), seed=seed, **kw)


def test_all_tied_costs_the_worst_case_and_stays_within_budget():
    examples, cands = [Ex(i) for i in range(384)], _grid()
    rows = [{"top1": i % 3 == 0, "logprob": -1.0} for i in range(384)]
    table = {None: rows, **{c: rows for c in cands}}  # every candidate identical: every paired CI is [0, 0]
    hv = _run(examples, cands, table)
    s = hv.schedule
    assert hv.scored_examples == s.worst <= BUDGET * s.grid
    assert hv.trace[-2]["kept"] == hv.trace[-2]["candidates"]  # the CI rule kept everyone at the last cut


def test_separated_candidates_cost_the_best_case():
    examples, cands = [Ex(i) for i in range(384)], _grid()
    quality = {c: 0.05 for c in cands}
    quality[cands[7]] = 0.95  # one clear winner: everyone else is shown worse at the last cut
    hv = _run(examples, cands, _table(examples, cands, random.Random(1), quality))
    assert hv.scored_examples == hv.schedule.best
    assert cands[7] in hv.survivors and len(hv.survivors) == -(-hv.trace[-2]["candidates"] // hv.schedule.eta)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_last_cut_drops_only_candidates_shown_worse(seed):
    examples, cands = [Ex(i) for i in range(400)], _grid()
    rng = random.Random(seed)
    quality = {c: 0.25 + 0.1 * rng.random() for c in cands}  # close candidates: the CI rule matters
    table = _table(examples, cands, rng, quality)
    hv = _run(examples, cands, table, seed=seed)
    s = hv.schedule
    assert s.best <= hv.scored_examples <= s.worst <= BUDGET * s.grid
    last = hv.trace[-2]
    entering = [c for c in cands if hv.scores[c].metrics["n"] >= last["examples"]]
    assert len(entering) == last["candidates"]
    leader = next(c for c in entering if c.key == last["leader"])
    n_seen = last["examples"]
    for c in entering:
        if c not in hv.survivors:  # dropped at the last cut: its paired CI to the leader excludes 0 (worse)
            ci = stats.paired_bootstrap(hv.scores[leader].values("top1")[:n_seen],
                                        hv.scores[c].values("top1")[:n_seen], seed=0)["ci95"]
            assert ci[1] < 0
    # survivors were scored on every example, and their means are the table's full means
    for c in hv.survivors:
        full = [r["top1"] for r in table[c]]
        assert hv.scores[c].metrics["top1"] == pytest.approx(sum(full) / len(full))


def test_table_scorer_replay_resumes_from_the_log():
    examples, cands = [Ex(i) for i in range(384)], _grid()
    table = _table(examples, cands, random.Random(3), {c: 0.3 for c in cands})
    log = ResultsLog(None, "t")
    scorer = TableScorer(examples, table)
    a = successive_halving(examples, cands, scorer.chunk, kept_metrics=["top1"], results=log, seed=5)
    b = successive_halving(examples, cands, scorer.chunk, kept_metrics=["top1"], results=log, seed=5)
    assert a.n_passes > 0 and b.n_passes == 0 and a.survivors == b.survivors and a.trace == b.trace


@pytest.mark.slow  # ~15 s on an idle 2-core machine: a grid and two halvings on the tiny model
def test_replay_from_the_grid_reproduces_a_measured_halving(tmp_path):
    """What bench/search_strategies.py relies on to draw many seeds: successive halving on a TableScorer fed
    the grid's per-example values gives the measured halving's rungs, survivors and scored-example count."""
    import json

    import torch

    from laser_export.architectures import family_for
    from laser_export.benchmarks import load_split
    from laser_export.search import LocalScorer, run_search
    from laser_export.search.sweep import KEPT_METRICS
    from tinymodels import tiny_model, tiny_tokenizer

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(f"w{int(t)}" for t in torch.randint(0, 100, (3,), generator=g)),
                                        "answer": f"w{int(torch.randint(0, 100, (1,), generator=g))}"}) + "\n"
                            for _ in range(60)))
    val = load_split("jsonl", path=path, seed=0, validation_fraction=0.9).validation
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    cands = [Candidate(l, m, r) for l in (2, 1) for m in ("fc_in", "fc_out") for r in (0.1, 0.5)]
    kept = [k for k in KEPT_METRICS if k != "n"]
    scorer = LocalScorer(model, tok, fam, val, batch_size=8, cache_start=1)
    rows = lambda r: [{k: v for k, v in row.items() if k in kept} for row in r.per_example]  # noqa: E731
    table = {None: rows(scorer.baseline_result()), **{c: rows(scorer.score_result([c])) for c in cands}}
    for seed in (0, 1):
        real = run_search(model, tok, fam, val, layers=[1, 2], matrices=["fc_in", "fc_out"], rhos=[0.1, 0.5],
                          batch_size=8, compose=1, progress=False, strategy="halving", eta=3, halving_seed=seed,
                          halving_min_examples=6).halving
        hv = _run(val, cands, table, seed=seed, eta=3, min_examples=6)
        assert hv.trace == real["rungs"] and hv.scored_examples == real["scored_examples"]
        assert [c.key for c in hv.survivors] == real["survivors"]
