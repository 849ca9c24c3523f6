"""Baseline cache: a rerun reads the baseline and the captured prefix instead of scoring the baseline, replays only
the reduced blocks, with identical numbers; --no-cache scores."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

import laser_export.verify as verify_mod
from laser_export.architectures import family_for, layer_modules
from laser_export.baseline_cache import ENV_VAR, PREFIX_BUDGET_VAR
from laser_export.cli import main
from tinymodels import save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]


MATRIX = {"llama": "fc_in", "gpt2": "fc_in"}


@pytest.fixture
def ws(tmp_path, monkeypatch, request):
    model_type = getattr(request, "param", "llama")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    save_tiny(model_type, tmp_path / "model")
    with open(tmp_path / "bench.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"{WORDS[i]} {WORDS[(3 * i + 1) % 90]}", "answer": WORDS[(11 * i) % 90]}) + "\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "model": {"source": str(tmp_path / "model")}, "storage": "factorised",
        "interventions": [{"layer": 2, "matrix": MATRIX[model_type], "rho": 0.1}],
        "benchmark": {"name": "jsonl", "path": str(tmp_path / "bench.jsonl"), "validation_fraction": 0.25,
                      "batch_size": 4},
        "claims": {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5}, "tolerance": 1.0}}))
    calls = []  # the scoring passes, and per pass how often block 0 ran: ("reduced", 0) = replayed
    real = verify_mod.score

    def counting(scorer, model, *args, **kwargs):
        block0 = []
        handle = layer_modules(model, family_for(model.config.model_type))[0].register_forward_hook(
            lambda *_: block0.append(1))
        try:
            return real(scorer, model, *args, **kwargs)
        finally:
            handle.remove()
            calls.append((kwargs.get("description"), len(block0)))

    monkeypatch.setattr(verify_mod, "score", counting)
    return tmp_path, calls


def _verify(ws, name, *extra):
    root, _ = ws
    assert main(["verify", str(root / "r.yaml"), "--report", str(root / name), "--no-progress", *extra]) == 0
    return json.loads((root / name).read_text())


def _numbers(report):
    return report["metrics"], report["delta"], [c["measured"] for c in report["claims"]]


def _ran(calls):
    return [d for d, _ in calls]


def _first_and_rerun(ws):
    """First run (captures, stores baseline and prefix), then a rerun that replays the stored prefix."""
    root, calls = ws
    first = _verify(ws, "1.json")
    assert _ran(calls) == ["baseline", "reduced"] and calls[0][1] > 0 and calls[1][1] == 0
    assert first["baseline_cache"]["hit"] is False and first["prefix_cache"] is True
    assert first["baseline_cache"]["prefix"]["status"] == "miss"  # captured in this run ...
    stored = first["baseline_cache"]["prefix"]["path"]  # ... and stored, named inside the cache folder
    assert stored.endswith(".safetensors") and not os.path.isabs(stored)
    assert os.path.getsize(root / "cache" / stored) == first["baseline_cache"]["prefix"]["bytes"]
    assert first["baseline_cache"]["status"] == "stored" and first["baseline_cache"]["path"] == f"{first['baseline_cache']['key']}.json"
    assert len(list((root / "cache").glob("*.json"))) == 1

    calls.clear()
    second = _verify(ws, "2.json")
    assert calls == [("reduced", 0)]  # no baseline pass, and the reduced pass never ran block 0
    assert second["baseline_cache"] == {**{k: v for k, v in first["baseline_cache"].items() if k != "reason"},
                                        "hit": True, "status": "hit",
                                        "prefix": {**first["baseline_cache"]["prefix"], "status": "hit", "reason": None}}
    assert second["prefix_cache"] is True
    assert _numbers(second) == _numbers(first)  # bit-identical: same floats, not approximately
    return first, second


def test_second_run_reads_baseline_and_prefix_from_cache_with_identical_numbers(ws, capsys):
    _, calls = ws
    first, _ = _first_and_rerun(ws)
    assert "baseline and prefix from cache" in capsys.readouterr().err

    calls.clear()
    third = _verify(ws, "3.json", "--no-cache")
    assert _ran(calls) == ["baseline", "reduced"] and third["baseline_cache"] is None
    assert _numbers(third) == _numbers(first)

    calls.clear()  # without replay the reduced pass runs full forwards; the cached baseline still serves
    fourth = _verify(ws, "4.json", "--no-prefix-cache")
    assert _ran(calls) == ["reduced"] and calls[0][1] > 0 and fourth["baseline_cache"]["hit"] is True
    assert fourth["baseline_cache"]["prefix"]["status"] == "skipped"
    assert fourth["metrics"]["baseline"] == first["metrics"]["baseline"]
    for m, v in first["metrics"]["reduced"].items():  # full forward vs replay: equal within float rounding
        assert fourth["metrics"]["reduced"][m] == pytest.approx(v, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("ws", ["gpt2"], indirect=True)
def test_rerun_replays_the_stored_prefix_gpt2(ws):
    _, calls = ws
    first, _ = _first_and_rerun(ws)
    calls.clear()
    assert _numbers(_verify(ws, "3.json", "--no-cache")) == _numbers(first)


@pytest.mark.slow
def test_another_lowest_layer_misses_the_prefix_and_captures_again(ws):
    root, calls = ws
    _verify(ws, "1.json")
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["interventions"][0]["layer"] = 1
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    calls.clear()
    second = _verify(ws, "2.json")  # same baseline key, but no prefix entering block 1
    assert _ran(calls) == ["baseline", "reduced"] and calls[1][1] == 0
    assert second["baseline_cache"]["hit"] is False and second["baseline_cache"]["prefix"]["status"] == "miss"
    assert len(list((root / "cache").glob("*.safetensors"))) == 2
    calls.clear()
    third = _verify(ws, "3.json")
    assert calls == [("reduced", 0)] and third["baseline_cache"]["prefix"]["status"] == "hit"
    assert _numbers(third) == _numbers(second) == _numbers(_verify(ws, "4.json", "--no-cache"))


def test_a_corrupt_prefix_file_is_a_miss_never_wrong_numbers(ws):
    root, calls = ws
    first = _verify(ws, "1.json")
    path = root / "cache" / first["baseline_cache"]["prefix"]["path"]
    data = bytearray((root / path).read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the last tensor's data: same size, readable, wrong
    (root / path).write_bytes(bytes(data))
    calls.clear()
    second = _verify(ws, "2.json")
    assert "checksum" in second["baseline_cache"]["prefix"]["reason"]
    assert second["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    assert _numbers(second) == _numbers(first)
    (root / path).write_bytes(bytes(data[: len(data) // 2]))  # truncated
    calls.clear()
    third = _verify(ws, "3.json")
    assert third["baseline_cache"]["prefix"]["status"] == "miss" and "unusable" in third["baseline_cache"]["prefix"]["reason"]
    assert _numbers(third) == _numbers(first)
    calls.clear()  # the capture pass stored a good file again
    assert _verify(ws, "4.json")["baseline_cache"]["prefix"]["status"] == "hit" and calls == [("reduced", 0)]


@pytest.mark.slow
def test_a_prefix_whose_batches_differ_is_refused_at_replay(ws):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from laser_export.baseline_cache import _tensors_sha256

    root, calls = ws
    first = _verify(ws, "1.json")
    path = str(root / "cache" / first["baseline_cache"]["prefix"]["path"])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    ids = json.loads(meta["structure"])["batches"][0]["input_ids"]["T"]
    tensors[ids] = tensors[ids].flip(0).contiguous()  # a consistent, checksummed file of other batches
    save_file(tensors, path, metadata={**meta, "sha256": _tensors_sha256(tensors)})
    calls.clear()
    second = _verify(ws, "2.json")
    assert second["baseline_cache"]["prefix"]["status"] == "miss"
    assert "replay refused" in second["baseline_cache"]["prefix"]["reason"]
    assert _ran(calls) == ["reduced", "reduced"] and calls[1][1] > 0 and second["prefix_cache"] is False
    for m, v in first["metrics"]["reduced"].items():
        assert second["metrics"]["reduced"][m] == pytest.approx(v, abs=1e-5)


def test_a_prefix_over_the_budget_is_skipped_and_the_baseline_still_served(ws, monkeypatch):
    root, calls = ws
    monkeypatch.setenv(PREFIX_BUDGET_VAR, "1e-9")  # 1 byte
    first = _verify(ws, "1.json")
    pre = first["baseline_cache"]["prefix"]
    assert pre["status"] == "skipped" and PREFIX_BUDGET_VAR in pre["reason"] and pre["bytes"] > 1
    assert not list((root / "cache").glob("*.safetensors"))
    calls.clear()  # the marker says it does not fit: baseline from cache, reduced model with full forwards
    second = _verify(ws, "2.json")
    assert _ran(calls) == ["reduced"] and calls[0][1] > 0 and second["baseline_cache"]["hit"] is True
    assert second["baseline_cache"]["prefix"]["status"] == "skipped" and second["prefix_cache"] is False
    monkeypatch.setenv(PREFIX_BUDGET_VAR, "2")  # a larger budget: capture again and store it
    calls.clear()
    third = _verify(ws, "3.json")
    assert _ran(calls) == ["baseline", "reduced"] and third["baseline_cache"]["prefix"]["path"]
    assert third["metrics"]["baseline"] == first["metrics"]["baseline"]


def test_a_changed_model_file_or_split_misses_the_cache(ws):
    root, calls = ws
    _verify(ws, "1.json")
    weights = root / "model" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same content: a hit
    calls.clear()
    assert _verify(ws, "2.json")["baseline_cache"]["hit"] is True and _ran(calls) == ["reduced"]
    # other weights of the same size, copied in with their mtime kept (cp -p, rsync -a): a miss
    save_tiny("llama", root / "other", seed=1)
    shutil.copy2(root / "other" / "model.safetensors", weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights.stat().st_size == st.st_size
    calls.clear()
    assert _verify(ws, "2.json")["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["benchmark"]["seed"] = 1  # other examples on the test side
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    calls.clear()
    assert _verify(ws, "3.json")["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    assert len(list((root / "cache").glob("*.json"))) == 3
