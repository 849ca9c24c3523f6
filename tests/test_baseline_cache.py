"""Baseline cache: a rerun reads the baseline instead of scoring it, with identical numbers; --no-cache scores."""

from __future__ import annotations

import json
import os

import pytest
import yaml

import laser_export.verify as verify_mod
from laser_export.baseline_cache import ENV_VAR
from laser_export.cli import main
from tinymodels import save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    save_tiny("llama", tmp_path / "model")
    with open(tmp_path / "bench.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"{WORDS[i]} {WORDS[(3 * i + 1) % 90]}", "answer": WORDS[(11 * i) % 90]}) + "\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "model": {"source": str(tmp_path / "model")}, "storage": "factorised",
        "interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1}],
        "benchmark": {"name": "jsonl", "path": str(tmp_path / "bench.jsonl"), "validation_fraction": 0.25,
                      "batch_size": 4},
        "claims": {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5}, "tolerance": 1.0}}))
    calls = []
    real = verify_mod.score

    def counting(*args, **kwargs):
        calls.append(kwargs.get("description"))
        return real(*args, **kwargs)

    monkeypatch.setattr(verify_mod, "score", counting)
    return tmp_path, calls


def _verify(ws, name, *extra):
    root, _ = ws
    assert main(["verify", str(root / "r.yaml"), "--report", str(root / name), "--no-progress", *extra]) == 0
    return json.loads((root / name).read_text())


def _numbers(report):
    return report["metrics"], report["delta"], [c["measured"] for c in report["claims"]]


def test_second_run_reads_the_baseline_from_cache_with_identical_numbers(ws):
    root, calls = ws
    first = _verify(ws, "1.json")
    assert calls == ["baseline", "reduced"] and first["baseline_cache"]["hit"] is False
    assert first["prefix_cache"] is True
    assert len(list((root / "cache").glob("*.json"))) == 1

    calls.clear()
    second = _verify(ws, "2.json")
    assert calls == ["reduced"]  # the baseline scorer did not run
    assert second["baseline_cache"] == {**first["baseline_cache"], "hit": True}
    assert second["prefix_cache"] is False  # no capture pass: the reduced model ran full forwards
    assert _numbers(second) == _numbers(first)

    calls.clear()
    third = _verify(ws, "3.json", "--no-cache")
    assert calls == ["baseline", "reduced"] and third["baseline_cache"] is None
    assert _numbers(third) == _numbers(first)


def test_a_changed_model_file_or_split_misses_the_cache(ws):
    root, calls = ws
    _verify(ws, "1.json")
    weights = root / "model" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a rewritten file
    calls.clear()
    assert _verify(ws, "2.json")["baseline_cache"]["hit"] is False and calls == ["baseline", "reduced"]
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["benchmark"]["seed"] = 1  # other examples on the test side
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    calls.clear()
    assert _verify(ws, "3.json")["baseline_cache"]["hit"] is False and calls == ["baseline", "reduced"]
    assert len(list((root / "cache").glob("*.json"))) == 3
