"""Several tasks at once: ``search --benchmark a,b`` selects by the weighted mean paired top-1 gain, reports
each task's test delta and CI, and the recipe names the primary task and lists the others' deltas."""

from __future__ import annotations

import json

import pytest

from laser_export.cli import main
from laser_export.recipe import load_recipe
from tinymodels import save_tiny


def _task(path, offset, n=24):
    path.write_text("".join(json.dumps({"prompt": f"w{(i * 7 + offset) % 90} w{(i * 3 + offset) % 90}",
                                        "answer": f"w{(i * 11 + offset) % 90}"}) + "\n" for i in range(n)))
    return path


def test_metrics_of_weighted_mean_per_task():
    from types import SimpleNamespace

    from laser_export.search.sweep import metrics_of

    rows = [{"top1": True, "logprob": -1.0}, {"top1": False, "logprob": -3.0}, {"top1": True, "logprob": -2.0}]
    m = metrics_of(SimpleNamespace(per_example=rows, metrics={}), [("a", 2, 0.25), ("b", 1, 0.75)])
    assert m["task:a:top1"] == 0.5 and m["task:b:top1"] == 1.0
    assert m["top1"] == pytest.approx(0.25 * 0.5 + 0.75 * 1.0) and m["logprob"] == pytest.approx(0.25 * -2 + 0.75 * -2)
    assert m["n"] == 3


def test_cli_search_two_tasks(tmp_path, capsys):
    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    a, b = _task(tmp_path / "a.jsonl", 0), _task(tmp_path / "b.jsonl", 5)
    out = tmp_path / "found.yaml"
    rc = main(["search", "--model", str(folder), "--benchmark", "jsonl,jsonl", "--benchmark-path", f"{a},{b}",
               "--task-weights", "1,3", "--layers", "1-2", "--matrices", "fc_in", "--rhos", "0.1,0.5", "--compose", "1",
               "--batch-size", "8", "--validation-fraction", "0.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    tasks = sweep["test"]["tasks"]
    assert list(tasks) == ["jsonl:a", "jsonl:b"] and tasks["jsonl:b"]["weight"] == 0.75
    for t in tasks.values():
        assert t["n"] == 12 and len(t["delta_top1_bootstrap"]["ci95"]) == 2
    expect = sum(t["weight"] * t["delta_top1_bootstrap"]["estimate"] for t in tasks.values())
    assert sweep["test"]["objective"] == pytest.approx(expect)
    # the selection top1 is the weighted mean of the tasks' top1
    for r in sweep["candidates"]:
        m = r["metrics"]
        assert m["top1"] == pytest.approx(0.25 * m["task:jsonl:a:top1"] + 0.75 * m["task:jsonl:b:top1"])
    recipe, text = load_recipe(out)
    assert recipe.benchmark.path == str(a)  # the primary task
    assert "primary task jsonl:a" in text and "Also measured on jsonl:b test (n=12)" in text
    assert "task jsonl:b" in capsys.readouterr().err


def test_task_weights_need_several_tasks(tmp_path):
    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    a = _task(tmp_path / "a.jsonl", 0)
    rc = main(["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(a),
               "--task-weights", "1,2", "--out", str(tmp_path / "x.yaml"), "--no-progress"])
    assert rc == 2
