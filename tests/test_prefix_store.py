"""The prefix cache's flat form and its safetensors file in the baseline cache: what capture records for each
family round-trips bit-exactly, replays to the same logits, and anything unusable is a miss or a skip."""

from __future__ import annotations

import pytest
import torch

from laser_export.architectures import family_for
from laser_export.baseline_cache import BaselineCache, prefix_identity
from laser_export.prefix import PrefixCache
from tinymodels import tiny_inputs, tiny_model

FAMILIES = ["llama", "gpt2",
            *(pytest.param(t, marks=pytest.mark.slow) for t in ("gptj", "gemma3_text", "gemma3", "gpt_neox", "opt"))]


def _captured(model_type: str, start: int = 1, batches: int = 2):
    model = tiny_model(model_type)
    cache = PrefixCache(model, family_for(model.config.model_type), start, lazy_capture=True, replay_layers=[start])
    for b in range(batches):
        ids = tiny_inputs(batch=3, seq=6 + b, seed=b)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding in one row
        with torch.inference_mode():
            cache.capture(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    return model, cache


def _replayed(cache: PrefixCache) -> list[torch.Tensor]:
    fn = cache.replay(cache.start)
    return [fn(cache.model, b.input_ids, None, None).materialize() for b in cache.batches]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_stored_prefix_replays_bit_exactly(model_type, tmp_path):
    model, cache = _captured(model_type)
    store = BaselineCache(directory=tmp_path)
    pid = prefix_identity(cache)
    written = store.store_prefix("k", pid, cache)
    assert written.status == "miss" and written.path and written.bytes > 0
    fresh = PrefixCache(model, cache.family, cache.start, lazy_capture=True, replay_layers=[cache.start])
    got = store.load_prefix("k", pid, fresh)
    assert got.status == "hit", got.reason
    assert len(fresh.batches) == len(cache.batches)
    for a, b in zip(cache.batches, fresh.batches):
        assert torch.equal(a.input_ids, b.input_ids) and sorted(a.inputs) == sorted(b.inputs)
        for i in a.inputs:  # same values, dtypes and the same None/bool non-tensor inputs
            (aa, ak), (ba, bk) = a.inputs[i], b.inputs[i]
            assert len(aa) == len(ba) and list(ak) == list(bk)
            for x, y in zip([*aa, *ak.values()], [*ba, *bk.values()]):
                xs = x if isinstance(x, (tuple, list)) else (x,)
                ys = y if isinstance(y, (tuple, list)) else (y,)
                for u, v in zip(xs, ys, strict=True):
                    if isinstance(u, torch.Tensor):
                        assert u.dtype == v.dtype and torch.equal(u, v)
                    else:
                        assert u == v and type(u) is type(v)
    for x, y in zip(_replayed(cache), _replayed(fresh)):
        assert torch.equal(x, y)


def test_another_start_layer_or_a_tampered_file_is_a_miss(tmp_path):
    model, cache = _captured("llama", start=1)
    store = BaselineCache(directory=tmp_path)
    pid = prefix_identity(cache)
    path = tmp_path / store.store_prefix("k", pid, cache).path
    other = PrefixCache(model, cache.family, 2, lazy_capture=True, replay_layers=[2])
    assert store.load_prefix("k", prefix_identity(other), other).status == "miss"  # no entry for layer 2
    # a file renamed into another identity's place: its recorded identity does not match
    import shutil

    shutil.copy(path, store.prefix_path("k", prefix_identity(other)))
    got = store.load_prefix("k", prefix_identity(other), other)
    assert got.status == "miss" and "another model" in got.reason and not other.batches
    with open(path, "r+b") as f:  # garbage header
        f.write(b"\xff" * 16)
    fresh = PrefixCache(model, cache.family, 1, lazy_capture=True, replay_layers=[1])
    got = store.load_prefix("k", pid, fresh)
    assert got.status == "miss" and "unusable" in got.reason and not fresh.batches
    assert BaselineCache(enabled=False).load_prefix("k", pid, fresh).status == "skipped"


def test_an_input_of_unknown_type_is_not_stored(tmp_path):
    _, cache = _captured("llama")
    args, kwargs = cache.batches[0].inputs[1]
    cache.batches[0].inputs[1] = (args, {**kwargs, "odd": object()})
    got = BaselineCache(directory=tmp_path).store_prefix("k", prefix_identity(cache), cache)
    assert got.status == "skipped" and "object" in got.reason
    assert not list(tmp_path.glob("*.safetensors"))
