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
from laser_export.baseline_cache import ENV_VAR
from laser_export.defaults import PREFIX_CACHE_GB_VAR as PREFIX_BUDGET_VAR
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


# -- keyed by content, checked on read (issue 21) --------------------------------------------------------


def _set_model(root, folder):
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["model"]["source"] = str(folder)
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))


def _keep_stat(path, write):
    """Rewrite ``path`` via ``write()`` keeping its size and mtime (what cp -p / rsync -a onto it look like)."""
    st = path.stat()
    write()
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_changed_tokenizer_or_remote_code_file_misses_the_cache(ws):
    root, calls = ws
    first = _verify(ws, "1.json")
    tok = root / "model" / "tokenizer.json"
    text = tok.read_text()
    assert '"w4"' in text
    _keep_stat(tok, lambda: tok.write_text(text.replace('"w4":', '"x4":', 1)))  # another vocabulary
    calls.clear()
    second = _verify(ws, "2.json")
    assert second["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    (root / "model" / "modeling_extra.py").write_text("SCALE = 2.0\n")  # remote code next to the weights
    calls.clear()
    third = _verify(ws, "3.json")
    assert third["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    assert len({r["baseline_cache"]["key"] for r in (first, second, third)}) == 3


def test_an_entry_or_prefix_copied_under_another_key_is_refused(ws):
    root, calls = ws
    save_tiny("llama", root / "other", seed=1)
    a = _verify(ws, "a.json")
    _set_model(root, root / "other")
    b = _verify(ws, "b.json")
    cache = root / "cache"
    ka, kb = a["baseline_cache"]["key"], b["baseline_cache"]["key"]
    assert ka != kb and a["metrics"]["baseline"] != b["metrics"]["baseline"]
    # A's prefix (other hidden states, same examples and shapes) copied over B's
    (cache / b["baseline_cache"]["prefix"]["path"]).write_bytes((cache / a["baseline_cache"]["prefix"]["path"]).read_bytes())
    calls.clear()
    again = _verify(ws, "b2.json")
    assert again["baseline_cache"]["prefix"]["status"] == "miss" and "another" in again["baseline_cache"]["prefix"]["reason"]
    assert _ran(calls) == ["baseline", "reduced"] and _numbers(again) == _numbers(b)
    # A's entry copied over B's: refused, scored again
    (cache / f"{kb}.json").write_bytes((cache / f"{ka}.json").read_bytes())
    calls.clear()
    again = _verify(ws, "b3.json")
    assert again["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    assert _numbers(again) == _numbers(b)


def test_cached_rows_are_paired_by_example_id(ws):
    root, calls = ws
    first = _verify(ws, "1.json")
    entry = root / "cache" / first["baseline_cache"]["path"]
    data = json.loads(entry.read_text())
    data["per_example"].reverse()  # same rows, other order
    entry.write_text(json.dumps(data))
    calls.clear()
    second = _verify(ws, "2.json")
    assert second["baseline_cache"]["hit"] is True and calls == [("reduced", 0)]
    assert _numbers(second) == _numbers(first)
    data["per_example"] = data["per_example"][1:]  # one example missing: not this run's baseline
    entry.write_text(json.dumps(data))
    calls.clear()
    third = _verify(ws, "3.json")
    assert third["baseline_cache"]["hit"] is False and _ran(calls) == ["baseline", "reduced"]
    assert _numbers(third) == _numbers(first)


def test_the_report_names_no_cache_path(ws):
    root, _ = ws
    for name in ("1.json", "2.json"):
        _verify(ws, name)
        text = (root / name).read_text()
        assert str(root / "cache") not in text and os.path.expanduser("~") + "/" not in text


def test_an_unusable_cache_folder_is_a_warning_and_the_run_goes_on(ws, monkeypatch, capsys):
    root, calls = ws
    (root / "afile").write_text("not a folder")
    monkeypatch.setenv(ENV_VAR, str(root / "afile"))
    report = _verify(ws, "1.json")
    err = capsys.readouterr().err
    assert report["baseline_cache"] is None and _ran(calls) == ["baseline", "reduced"]
    warning = [line for line in err.splitlines() if "warning" in line and ENV_VAR in line]
    assert len(warning) == 1 and "not a folder" in warning[0]
    assert err.index(warning[0]) < err.index("tiny:")  # said before scoring


def test_a_full_disk_while_storing_is_reported_not_fatal(ws, monkeypatch, capsys):
    import errno

    import laser_export.baseline_cache as bc

    root, calls = ws

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bc, "write_text", full)
    monkeypatch.setattr(bc, "write_via", full)
    report = _verify(ws, "1.json")
    info = report["baseline_cache"]
    assert info["status"] == "miss" and "No space left" in info["reason"] and info["path"] is None
    assert info["prefix"]["status"] == "skipped" and "No space left" in info["prefix"]["reason"]
    assert "baseline not cached" in capsys.readouterr().err
    assert not list((root / "cache").glob("*.json"))


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1"])
def test_a_bad_prefix_budget_is_exit_2_before_loading(ws, monkeypatch, capsys, value):
    root, calls = ws
    monkeypatch.setenv(PREFIX_BUDGET_VAR, value)
    assert main(["verify", str(root / "r.yaml"), "--report", str(root / "1.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert PREFIX_BUDGET_VAR in err and len(err.strip().splitlines()) == 1 and calls == []
    assert not (root / "1.json").exists()


def test_part_debris_of_dead_writers_is_removed_when_the_cache_opens(ws):
    root, _ = ws
    cache = root / "cache"
    cache.mkdir()
    dead = cache / ".abc.json.99999999-x1y2.part"  # no such pid
    alive = cache / f".abc.json.{os.getpid()}-x1y2.part"
    stale = cache / ".abc.json.q9w8e7.part"  # an older writer's, without a pid, untouched for 2 hours
    for p in (dead, alive, stale):
        p.write_bytes(b"\0" * 1024)
    os.utime(stale, (os.path.getmtime(stale) - 7200,) * 2)
    _verify(ws, "1.json")
    assert not dead.exists() and not stale.exists() and alive.exists()


def test_non_finite_scores_are_not_cached(tmp_path):
    from laser_export.baseline_cache import BaselineCache
    from laser_export.evaluate import ScoreResult

    store = BaselineCache(directory=tmp_path)
    path, why = store.store("k", {"m": 1}, ScoreResult([{"id": "a", "logprob": float("nan")}], {"logprob": float("nan")}))
    assert path is None and "NaN" in why and not list(tmp_path.glob("*.json"))
    path, why = store.store("k", {"m": 1}, ScoreResult([{"id": "a", "top1": True}], {"top1": 1.0}))
    assert path is not None and why is None
    assert store.load("k", {"m": 1}, ["a"])[0].metrics == {"top1": 1.0}
    assert store.load("k", {"m": 2}, ["a"])[0] is None  # another identity under the same key
    assert store.load("k", {"m": 1}, ["b"])[0] is None  # other examples


@pytest.mark.slow  # an end-to-end CLI run (export + ONNX/push/full forwards): run by .ci/run's slow suite
def test_a_forward_that_transforms_the_logits_is_never_replayed(ws, monkeypatch):
    """A model whose forward scales its logits (remote code): replay (blocks + norm + head) is not its
    forward, so the reduced pass runs full forwards and the numbers equal --no-prefix-cache's."""
    import transformers

    root, calls = ws
    real = transformers.LlamaForCausalLM.forward

    def scaled(self, *a, **k):
        out = real(self, *a, **k)
        out.logits = out.logits * 3.0
        return out

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", scaled)
    first = _verify(ws, "1.json")
    assert first["prefix_cache"] is False and first["baseline_cache"]["prefix"]["status"] == "skipped"
    assert "not LlamaForCausalLM.forward" in first["baseline_cache"]["prefix"]["reason"]
    plain = _verify(ws, "2.json", "--no-cache", "--no-prefix-cache")
    assert _numbers(first) == _numbers(plain)
    calls.clear()  # the marker says so: the cached baseline, full forwards
    second = _verify(ws, "3.json")
    assert second["baseline_cache"]["hit"] is True and _ran(calls) == ["reduced"] and calls[0][1] > 0
    assert _numbers(second) == _numbers(first)
