"""A factorised export loads with plain transformers + trust_remote_code=True, without laser-export installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cleanenv import make_clean_venv, run_clean
from laser_export.architectures import family_for
from laser_export.export.safetensors import write_checkpoint
from laser_export.policy import atomic_folder
from laser_export.intervene import plan_targets, reduce_model
from laser_export.lowrank import LowRankLinear
from laser_export.recipe import Intervention
from tinymodels import tiny_inputs, tiny_model, tiny_tokenizer

IVS = [Intervention(layer=2, matrix="fc_in", rho=0.1), Intervention(layer=1, matrix="o", rank=2)]
FAMILIES = ["llama", "gpt2", "roberta"]  # gated MLP, Conv1D, masked LM


def _export(model_type, storage, out):
    model = tiny_model(model_type)
    fam = family_for(model.config.model_type)
    entries = reduce_model(model, fam, plan_targets(IVS, model.config, fam), storage=storage)
    with atomic_folder(out) as tmp:
        manifest = write_checkpoint(model, tiny_tokenizer(), tmp)
    return model, manifest


def _loader_code(folder, auto_class, npy):
    return (
        "import numpy, torch, transformers\n"
        f"m = transformers.{auto_class}.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        "import sys; assert 'laser_export' not in sys.modules\n"
        f"x = torch.from_numpy(numpy.load({str(npy)!r}))\n"
        "with torch.no_grad():\n"
        f"    numpy.save({str(npy)!r}.replace('.npy', '.out.npy'), m(x).logits.numpy())\n"
        "print('LOADED', type(m).__name__, sorted({type(x).__name__ for x in m.modules()} & {'LowRankLinear'}))\n"
    )


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
    return make_clean_venv(tmp_path_factory.mktemp("venv") / "v")


def test_factorised_export_carries_auto_map_and_dense_does_not(tmp_path):
    _, manifest = _export("llama", "factorised", tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_laser.LaserLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_laser.LaserLlamaForCausalLM"}
    assert manifest["auto_map"] == config["auto_map"]
    assert config["quantization_config"]["quant_method"] == "laser"  # laser-export's own path still works
    assert "class LaserLlamaForCausalLM(LaserLoadMixin, LlamaForCausalLM)" in (tmp_path / "f" / "modeling_laser.py").read_text()
    _export("roberta", "factorised", tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "modeling_laser.LaserRobertaConfig", "AutoModelForMaskedLM": "modeling_laser.LaserRobertaForMaskedLM"}
    _export("llama", "dense", tmp_path / "d")
    assert "auto_map" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert not (tmp_path / "d" / "modeling_laser.py").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_remote_code_loads_without_laser_export_with_same_logits(tmp_path, clean_python, model_type):
    model, _ = _export(model_type, "factorised", tmp_path / "out")
    x = tiny_inputs()
    np.save(tmp_path / "x.npy", x.numpy())
    auto_class = family_for(model_type).auto_class
    res = run_clean(clean_python, _loader_code(tmp_path / "out", auto_class, tmp_path / "x.npy"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED Laser" in res.stdout and "['LowRankLinear']" in res.stdout
    with torch.no_grad():
        expected = model(x).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "x.out.npy"), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_remote_code_refuses_a_checkpoint_with_a_missing_factor(tmp_path, clean_python):
    _export("llama", "factorised", tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    del tensors["model.layers.2.mlp.gate_proj.weight_out"]
    save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    np.save(tmp_path / "x.npy", tiny_inputs().numpy())
    res = run_clean(clean_python, _loader_code(tmp_path / "out", "AutoModelForCausalLM", tmp_path / "x.npy"),
                    cwd=tmp_path)
    assert res.returncode != 0 and "LOADED" not in res.stdout
    assert "LaserLoadError" in res.stderr
    assert "model.layers.2.mlp.gate_proj.weight_out is missing from the checkpoint" in res.stderr


def test_with_laser_export_imported_both_paths_load_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    model, _ = _export("llama", "factorised", tmp_path / "out")
    x = tiny_inputs()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # laser-export's quantizer, no remote code
    assert type(plain).__name__ == "LlamaForCausalLM"
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(remote).__name__ == "LaserLlamaForCausalLM"
    assert isinstance(remote.get_submodule("model.layers.2.mlp.gate_proj"), LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(remote(x).logits, model(x).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_remote_code_refuses_tampered_ranks_even_with_ignore_mismatched_sizes(tmp_path, clean_python):
    """A rank in quantization_config that disagrees with the stored factors: transformers, told to
    ignore_mismatched_sizes, would leave those factors uninitialised (NaN logits); the shipped code refuses
    (with laser_export imported its own quantizer refuses first: test_hostile)."""
    _export("llama", "factorised", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    ranks = config["quantization_config"]["ranks"]
    ranks["model.layers.2.mlp.gate_proj"] = int(ranks["model.layers.2.mlp.gate_proj"]) + 3
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    code = ("import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True, "
            "ignore_mismatched_sizes=True)\nprint('LOADED')\n")
    res = run_clean(clean_python, code, cwd=tmp_path)
    assert res.returncode != 0 and "LOADED" not in res.stdout
    assert "LaserLoadError" in res.stderr and "does not have the shape its recorded rank implies" in res.stderr
