"""Measuring without claims: ``verify`` on a recipe with a benchmark but no claims measures baseline and
reduced, writes the report and exits 0; ``split: all`` scores every example; ``apply --report`` carries a
claim-less report into a card that says "measured, no claims"."""

import json

import pytest
import yaml

from laser_export.cli import main
from tinymodels import save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    save_tiny("llama", root / "model")
    with open(root / "bench.jsonl", "w") as f:
        for i in range(24):
            a, b = WORDS[i % 90], WORDS[(3 * i + 1) % 90]
            f.write(json.dumps({"prompt": f"{a} {b}", "answer": WORDS[(i * 11) % 90]}) + "\n")
    return root


def _recipe(ws, path, **bench):
    r = {
        "name": "tiny-measure",
        "model": {"source": str(ws / "model")},
        "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
        "benchmark": {"name": "jsonl", "path": str(ws / "bench.jsonl"), "seed": 0, "batch_size": 8, **bench},
    }
    path.write_text(yaml.safe_dump(r))
    return path


def test_verify_without_claims_measures_and_exits_0(ws, tmp_path, capsys):
    recipe = _recipe(ws, tmp_path / "r.yaml", validation_fraction=0.25)
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    rep = json.loads(report.read_text())
    assert rep["claims"] == [] and rep["metrics"]["baseline"]["n"] == 18 and "top1" in rep["delta"]
    out = capsys.readouterr().err  # the console writes to stderr
    assert "measured, no claims" in out and "baseline" in out


def test_split_all_scores_every_example(ws, tmp_path):
    recipe = _recipe(ws, tmp_path / "r.yaml", split="all")
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    rep = json.loads(report.read_text())
    assert rep["benchmark"]["split"] == "all" and rep["benchmark"]["n_scored"] == 24
    assert rep["metrics"]["reduced"]["n"] == 24


def test_verify_without_benchmark_is_refused(ws, tmp_path, capsys):
    r = yaml.safe_load(_recipe(ws, tmp_path / "r.yaml").read_text())
    del r["benchmark"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["verify", str(tmp_path / "r.yaml"), "--no-progress"]) == 2
    assert "benchmark" in capsys.readouterr().err


def test_apply_with_claimless_report_card_says_measured(ws, tmp_path):
    recipe = _recipe(ws, tmp_path / "r.yaml", split="all")
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    out = tmp_path / "out"
    assert main(["apply", str(recipe), "--out", str(out), "--report", str(report), "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "Measured, no claims" in card and "FAILED" not in card
