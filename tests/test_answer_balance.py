"""Choice tasks: an accuracy gain that is the model answering one class for everything is called out."""

from __future__ import annotations

import pytest

from laser_export.answer_balance import COLLAPSE_SHARE, answer_balance, collapse_warning
from laser_export.benchmarks.base import Example
from laser_export.export.card import render_card
from laser_export.verify import print_report

from test_card import RECIPE_YAML, make_manifest, make_recipe, make_report

CHOICES = ("entailment", "non-entailment")


def _examples(labels):
    return [Example(id=f"e{i}", prompt=f"p{i}", answers=(CHOICES[y],), choices=CHOICES, label=y)
            for i, y in enumerate(labels)]


def test_majority_rate_and_prediction_share_are_counted_by_answer_text():
    labels = [1] * 62 + [0] * 38
    ex = _examples(labels)
    collapsed = [{"id": e.id, "prediction": 1} for e in ex]
    b = answer_balance(ex, collapsed)
    assert b == {"n": 100, "majority_answer": "non-entailment", "majority_rate": 0.62,
                 "top_prediction": "non-entailment", "top_prediction_share": 1.0}
    w = collapse_warning(b, 0.62)
    assert w and "'non-entailment' for 100.0% of the 100 examples" in w and "62.00%" in w
    # a model that tells the classes apart (80% right, both answers used) is not flagged
    mixed = [{"id": e.id, "prediction": y if i % 5 else 1 - y} for i, (e, y) in enumerate(zip(ex, labels))]
    b2 = answer_balance(ex, mixed)
    assert b2["top_prediction_share"] < COLLAPSE_SHARE and collapse_warning(b2, 0.8) is None
    # exactly at the threshold: flagged; just under: not
    n_same = int(COLLAPSE_SHARE * 100)
    at = [{"id": e.id, "prediction": 1 if i < n_same else 0} for i, e in enumerate(ex)]
    assert collapse_warning(answer_balance(ex, at)) is not None
    under = [{"id": e.id, "prediction": 1 if i < n_same - 1 else 0} for i, e in enumerate(ex)]
    assert collapse_warning(answer_balance(ex, under)) is None


def test_not_a_choice_task_or_misaligned_rows_give_none():
    ex = [Example(id="q", prompt="The capital of France is", answers=("Paris",))]
    assert answer_balance(ex, [{"id": "q", "top1": True}]) is None
    assert answer_balance(_examples([0, 1]), [{"id": "e0", "prediction": 0}]) is None  # lengths differ
    assert collapse_warning(None) is None


def _balance(share_reduced):
    base = {"n": 1600, "majority_answer": "non-entailment", "majority_rate": 0.62375,
            "top_prediction": "entailment", "top_prediction_share": 0.6}
    red = {**base, "top_prediction": "non-entailment", "top_prediction_share": share_reduced}
    return {"baseline": base, "reduced": red}


@pytest.mark.parametrize("share", [0.99, 0.7])
def test_verify_console_and_card_say_it_when_the_reduced_model_collapsed(share, capsys):
    report = make_report()
    report["benchmark"]["n_scored"] = 4000
    report["answer_balance"] = _balance(share)
    print_report(report)
    out = capsys.readouterr()
    text = out.out + out.err
    card = str(render_card(make_recipe(), RECIPE_YAML, make_manifest(), report))
    if share >= COLLAPSE_SHARE:
        assert "reduced model: the model answers 'non-entailment' for 99.0%" in " ".join(text.split())
        assert "**The reduced model answers 'non-entailment' for 99.0% of the 1600 examples" in card
        assert "collapse to one answer" in card
    else:
        assert "collapse" not in text and "collapse" not in card


def test_verify_records_the_answer_balance_of_a_choice_task(tmp_path):
    """End to end on a tiny llama: the report's answer_balance counts the scored test examples and its
    majority rate is the labels' own; predictions agree with the per-side accuracy."""
    import json

    import yaml

    from laser_export.benchmarks import load_split
    from laser_export.cli import main
    from tinymodels import save_tiny

    save_tiny("llama", tmp_path / "model")
    labels = [i % 3 == 0 for i in range(40)]  # 1/3 entailment
    lines = [json.dumps({"prompt": f"w{i} w{i % 7} holds?", "choices": list(CHOICES), "label": int(y)})
             for i, y in enumerate(labels)]
    data = tmp_path / "choice.jsonl"
    data.write_text("\n".join(lines) + "\n")
    bench = {"name": "jsonl", "path": str(data), "split": "test", "seed": 0, "validation_fraction": 0.25,
             "batch_size": 8}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "model": {"source": str(tmp_path / "model")},
                                      "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
                                      "benchmark": bench,
                                      "claims": {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5},
                                                 "tolerance": 1e-6}}))
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) in (0, 1)
    rep = json.loads(report.read_text())
    test = load_split("jsonl", path=data, seed=0, validation_fraction=0.25).test
    ones = sum(ex.label for ex in test)
    for side in ("baseline", "reduced"):
        bal = rep["answer_balance"][side]
        assert bal["n"] == rep["benchmark"]["n_scored"] == len(test)
        assert bal["majority_rate"] == max(ones, len(test) - ones) / len(test)
        assert 0 < bal["top_prediction_share"] <= 1
