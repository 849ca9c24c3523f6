"""save → from_pretrained → same logits, for dense and factorised exports; loud failure without the toolkit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from laser_export.architectures import family_for
from laser_export.export.safetensors import checkpoint_tensor_bytes, write_checkpoint
from laser_export.policy import OutputError, atomic_folder
from laser_export.atomic import write_json, write_text
from laser_export.intervene import plan_targets, reduce_model
from laser_export.lowrank import LowRankLinear
from laser_export.recipe import Intervention
from tinymodels import tiny_inputs, tiny_model, tiny_tokenizer

AUTO = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM}
IVS = [Intervention(layer=2, matrix="fc_in", rho=0.1), Intervention(layer=1, matrix="o", rank=2)]


def _export(model_type, storage, out, ivs=IVS):
    model = tiny_model(model_type)
    fam = family_for(model.config.model_type)
    entries = reduce_model(model, fam, plan_targets(ivs, model.config, fam), storage=storage)
    manifest = {"laser_export_version": "test", "storage": storage, "matrices": entries}
    with atomic_folder(out) as tmp:
        manifest.update(write_checkpoint(model, tiny_tokenizer(), tmp))
        write_json(tmp / "manifest.json", manifest)  # what the export writer adds (an export --overwrite replaces)
        write_text(tmp / "recipe.yaml", "name: t\n")
    return model, fam, entries


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "roberta"])
@pytest.mark.parametrize("storage", ["dense", "factorised"])
def test_roundtrip_same_logits(tmp_path, model_type, storage):
    model, fam, entries = _export(model_type, storage, tmp_path / "out")
    loaded = AUTO[fam.task].from_pretrained(tmp_path / "out").eval()
    for e in entries:
        assert isinstance(loaded.get_submodule(e["name"]), LowRankLinear) == (storage == "factorised")
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["checkpoint"]["tensor_bytes"] == checkpoint_tensor_bytes(tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in (tmp_path / "out").iterdir())
    assert (tmp_path / "out" / "recipe.yaml").read_text() == "name: t\n"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_factorised_checkpoint_is_smaller_by_exactly_the_factor_savings(tmp_path, model_type):
    _, _, dense_entries = _export(model_type, "dense", tmp_path / "dense")
    _, _, fact_entries = _export(model_type, "factorised", tmp_path / "fact")
    expected = 0
    for e in fact_entries:
        m, n = e["shape"]
        assert e["storage"] == "factorised"
        expected += (m * n - e["rank"] * (m + n)) * 4
        assert e["bytes_saved"] == (m * n - e["rank"] * (m + n)) * 4
    assert expected > 0
    assert checkpoint_tensor_bytes(tmp_path / "dense") - checkpoint_tensor_bytes(tmp_path / "fact") == expected
    # the safetensors files themselves shrink too (headers differ by a few bytes only)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))
    assert abs((size(tmp_path / "dense") - size(tmp_path / "fact")) - expected) < 1024


def _load_without_toolkit(folder):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "assert 'laser_export' not in sys.modules\n"
        "print('LOADED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_factorised_export_fails_loudly_without_the_toolkit(tmp_path):
    _export("llama", "factorised", tmp_path / "fact")
    res = _load_without_toolkit(tmp_path / "fact")
    assert res.returncode != 0 and "LOADED" not in res.stdout
    assert "ignore_mismatched_sizes" in res.stderr and "MISMATCH" in res.stderr


def test_dense_export_loads_without_the_toolkit(tmp_path):
    _export("llama", "dense", tmp_path / "dense")
    res = _load_without_toolkit(tmp_path / "dense")
    assert res.returncode == 0 and "LOADED" in res.stdout, res.stderr[-2000:]
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config


def test_failed_export_leaves_previous_export_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _export("llama", "dense", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match="already holds an export; pass --overwrite"):
        _export("llama", "factorised", out)

    model = tiny_model("llama")
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "partial.bin").write_bytes(b"x")
            write_checkpoint(model, None, tmp)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_sharded_factorised_export_loads_back(tmp_path):
    model = tiny_model("llama")
    fam = family_for("llama")
    entries = reduce_model(model, fam, plan_targets(IVS, model.config, fam), storage="factorised")
    with atomic_folder(tmp_path / "out") as tmp:
        manifest = write_checkpoint(model, tiny_tokenizer(), tmp, max_shard_size="40KB")
    shards = manifest["checkpoint"]["files"]
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)
