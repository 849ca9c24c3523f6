"""Successive halving (``search --strategy halving``): rung sizes, metrics equal to the grid's on the full
split for the survivors, fewer examples scored, resumable, and the paired-CI rule at the last cut."""

from __future__ import annotations

import json

import pytest
import torch

from laser_export.architectures import family_for
from laser_export.benchmarks import load_split
from laser_export.search import Candidate, ResultsLog, run_search
from laser_export.search.halving import Scores, _cut
from tinymodels import tiny_model, tiny_tokenizer


def test_last_cut_keeps_candidates_tied_with_the_leader():
    a, b, c = Candidate(1, "fc_in", 0.1), Candidate(1, "fc_in", 0.5), Candidate(2, "fc_in", 0.1)
    n = 40
    leader = [True] * 30 + [False] * 10
    tied = [True] * 29 + [False] * 11  # one example worse: CI includes 0
    worse = [False] * 40
    scores = {x: Scores([{"top1": v} for v in hits]) for x, hits in ((a, leader), (b, tied), (c, worse))}
    kept, extra = _cut([a, b, c], scores, 1, last_cut=True)
    assert kept == [a, b] and extra == [b]
    assert _cut([a, b, c], scores, 1, last_cut=False) == ([a], [])
    assert n == len(leader)


def _bench(path, n=60):
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        words = " ".join(f"w{int(t)}" for t in torch.randint(0, 100, (3,), generator=g))
        lines.append(json.dumps({"prompt": words, "answer": f"w{int(torch.randint(0, 100, (1,), generator=g))}"}))
    path.write_text("\n".join(lines) + "\n")
    return load_split("jsonl", path=path, seed=0, validation_fraction=0.9).validation


def test_halving_matches_grid_on_survivors_and_scores_fewer(tmp_path):
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    val = _bench(tmp_path / "b.jsonl")
    kw = dict(layers=[1, 2], matrices=["fc_in", "fc_out"], rhos=[0.1, 0.25, 0.5], batch_size=8, compose=1,
              progress=False)
    grid = run_search(model, tok, fam, val, **kw)
    log = tmp_path / "h.jsonl"
    hv = run_search(model, tok, fam, val, strategy="halving", eta=3, halving_min_examples=6,
                    results=ResultsLog(log, "k"), **kw)
    info = hv.halving
    assert [r["examples"] for r in info["rungs"]] == [6, 18, 54]
    assert info["scored_examples"] < 0.6 * info["grid_examples"]
    by_key = {(r["layer"], r["matrix"], r["rho"]): r for r in grid.candidates}
    assert sum(r["metrics"]["n"] == len(val) for r in hv.candidates) >= 2
    for r in hv.candidates:
        if r["metrics"]["n"] == len(val):  # survivors: scored on every example, by chunks
            g = by_key[(r["layer"], r["matrix"], r["rho"])]["metrics"]
            assert r["metrics"]["top1"] == pytest.approx(g["top1"], abs=1e-12)
            assert r["metrics"]["logprob"] == pytest.approx(g["logprob"], abs=1e-4)
    assert hv.baseline["top1"] == pytest.approx(grid.baseline["top1"], abs=1e-12)
    assert all(k in info["survivors"] for k in [hv.best.key])
    # resumed: every chunk score comes from the log, no scoring pass
    again = run_search(model, tok, fam, val, strategy="halving", eta=3, halving_min_examples=6,
                       results=ResultsLog(log, "k"), **kw)
    assert again.n_scored == 0 and again.best == hv.best
    assert again.halving["rungs"] == info["rungs"]


def test_cli_search_halving_from_scan_with_auto_rank(tmp_path):
    from laser_export import cli
    from laser_export.recipe import load_recipe
    from tinymodels import save_tiny

    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    _bench(tmp_path / "b.jsonl", n=80)
    scan_json = tmp_path / "scan.json"
    assert cli.main(["scan", str(folder), "--matrices", "fc_in,fc_out", "--out", str(scan_json), "--no-progress"]) == 0
    out = tmp_path / "found.yaml"
    rc = cli.main(["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(tmp_path / "b.jsonl"),
                   "--layers", "1-2", "--matrices", "fc_in,fc_out", "--rhos", "0.25,auto", "--strategy", "halving",
                   "--from-scan", str(scan_json), "--prune-snr", "0.75", "--compose", "1", "--batch-size", "8",
                   "--validation-fraction", "0.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    # 6 candidates on 40 examples: no cut fits a first part of 24 examples, so one rung (the grid), and it says so
    assert sweep["halving"]["sizes"] == [40] and sweep["halving"]["rungs"][-1]["examples"] == 40
    assert sweep["halving"]["within_budget"] is False and sweep["halving"]["worst_case_ratio"] == 1.0
    assert len({(r["layer"], r["matrix"]) for r in sweep["candidates"]}) == 3  # pruned by the scan's SNR
    scan = json.loads(scan_json.read_text())
    assert {r["snr"] for r in sweep["snr"]} <= {r["snr"] for r in scan["matrices"]}
    assert any(r["rho"] == "auto" for r in sweep["candidates"])
    load_recipe(out)  # a valid recipe (rank: auto when chosen)
    # a scan of another model type is refused before any weights load
    bad = json.loads(scan_json.read_text())
    bad["model_type"] = "gpt2"
    scan_json.write_text(json.dumps(bad))
    rc = cli.main(["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(tmp_path / "b.jsonl"),
                   "--layers", "1-2", "--matrices", "fc_in", "--from-scan", str(scan_json), "--out", str(out),
                   "--no-progress"])
    assert rc == 2


def test_beam_finds_a_pair_greedy_misses():
    from laser_export.search.compose import compose_beam, compose_greedy

    a, b, c = Candidate(1, "fc_in", 0.1), Candidate(2, "fc_in", 0.1), Candidate(3, "fc_in", 0.1)
    single = {a: {"top1": 0.30, "logprob": -1}, b: {"top1": 0.29, "logprob": -1}, c: {"top1": 0.28, "logprob": -1}}
    pairs = {frozenset({a, b}): 0.25, frozenset({a, c}): 0.26, frozenset({b, c}): 0.40}

    def evaluate_set(cands):
        return {"top1": pairs.get(frozenset(cands), 0.1), "logprob": -1}

    greedy, gm, _ = compose_greedy([a, b, c], evaluate_set, single, 2, 6)
    beam, bm, trace = compose_beam([a, b, c], evaluate_set, single, 2, width=2)
    assert greedy == [a] and gm["top1"] == 0.30
    assert set(beam) == {b, c} and bm["top1"] == 0.40 and len(trace) == 3
