"""One content identity (laser_export.identity): what transformers loads, by content, memoised by stat only."""

from __future__ import annotations

import json
import os
import shutil

import torch

from laser_export.architectures import family_for
from laser_export.identity import SIDECAR, file_sha256, model_identity, weight_files, weights_identity
from laser_export.prefix import PrefixCache, PrefixCacheError
from laser_export.sources import resolve_source
from tinymodels import save_tiny, tiny_inputs, tiny_model


def test_file_sha256_is_the_content_memoised_by_stat_never_across_a_change(tmp_path):
    import hashlib

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 3_000_000)
    want = hashlib.sha256(b"a" * 3_000_000).hexdigest()
    assert file_sha256(f, tmp_path / "memo") == want
    assert SIDECAR in os.listdir(tmp_path / "memo")
    st = f.stat()
    with open(f, "r+b") as fh:  # same inode, same size, mtime put back: ctime still moves
        fh.seek(10)
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f, tmp_path / "memo") != want
    # a sidecar entry for another stat is never used for this file
    memo = tmp_path / "memo" / SIDECAR
    data = json.loads(memo.read_text())
    assert all(v != want for v in data.values())  # the stale entry was dropped


def test_weight_files_are_what_transformers_loads(tmp_path):
    save_tiny("llama", tmp_path / "m")
    m = tmp_path / "m"
    shutil.copy(m / "model.safetensors", m / "model-backup.safetensors")
    assert weight_files(m) == [m / "model.safetensors"]
    a = model_identity(resolve_source(str(m)))
    assert "model-backup.safetensors" not in a["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(a["files"])
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-backup.safetensors"}}))
    assert weight_files(m) == [m / "model.safetensors"]  # from_pretrained takes model.safetensors before an index
    (m / "model.safetensors").unlink()
    assert weight_files(m) == [m / "model-backup.safetensors"]


def test_identity_covers_tokenizer_and_remote_code_not_paths_or_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_tiny("llama", a)
    shutil.copytree(a, b)  # new paths, new mtimes, same content
    assert weights_identity(str(a)) == weights_identity(str(b))
    (b / "modeling_extra.py").write_text("x = 1\n")
    assert weights_identity(str(a)) != weights_identity(str(b))
    (b / "modeling_extra.py").unlink()
    tok = b / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"w4":', '"x4":', 1))
    assert weights_identity(str(a)) != weights_identity(str(b))


def test_a_hub_source_is_its_commit():
    src = resolve_source("org/name@" + "a" * 40)
    assert model_identity(src) == {"hub": "org/name", "commit": "a" * 40}
    assert model_identity(resolve_source("org/name"), commit="b" * 40)["commit"] == "b" * 40


def test_prefix_replay_checks_it_is_the_models_forward():
    model = tiny_model("llama")
    fam = family_for("llama")
    ids = tiny_inputs(batch=2, seq=6)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    exact = PrefixCache(model, fam, 1, lazy_capture=True)
    with torch.inference_mode():
        exact.capture(model, ids, mask, pos)
    assert exact.exact is True

    real = type(model).forward

    class Scaled(type(model)):
        def forward(self, *a, **k):
            out = real(self, *a, **k)
            out.logits = out.logits * 0.5 + 1.0
            return out

    model.__class__ = Scaled
    cache = PrefixCache(model, fam, 1, lazy_capture=True)
    with torch.inference_mode():
        got = cache.capture(model, ids, mask, pos)
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        assert torch.equal(got, want)  # the baseline is the model's own forward
        second = cache.capture(model, ids, mask, pos)  # later batches too (no lazy body-only pass)
        assert torch.equal(second if isinstance(second, torch.Tensor) else second.materialize(), want)
    assert cache.exact is False and "Scaled.forward" in cache.inexact_reason
    try:
        cache.replay(1)
    except PrefixCacheError as err:
        assert "not Scaled.forward" in str(err)
    else:
        raise AssertionError("replay of an inexact prefix must be refused")


def test_granite_logits_scaling_is_not_replayed():
    """A real transformers model whose forward divides the logits (Granite's ``logits_scaling``): replay would
    skip it, so the capture keeps the model's own logits and replay is refused."""
    from tinymodels import TINY

    cfg_cls, model_cls, kw = TINY["granite"]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**kw, "logits_scaling": 4.0})).eval()
    ids = tiny_inputs(batch=2, seq=6)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = PrefixCache(model, family_for("granite"), 1, lazy_capture=True)
    with torch.inference_mode():
        got = cache.capture(model, ids, mask, pos)
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert cache.exact is False and torch.equal(got, want)
