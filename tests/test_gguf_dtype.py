"""export.dtype and the GGUF export format: written by the gguf package, read back by transformers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from laser_export.cli import main
from laser_export.export.gguf import GgufExportError, write_gguf
from laser_export.export.safetensors import read_safetensors_header
from tinymodels import TINY, save_tiny, tiny_inputs, tiny_model


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 1e-5), ("bfloat16", 1e-5)])
def test_gguf_loads_back_in_transformers_with_the_same_logits(tmp_path, dtype, atol):
    cfg_cls, model_cls, kw = TINY["llama"]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw, tie_word_embeddings=(dtype == "float16"))).eval()
    info = write_gguf(model, tmp_path / "m.gguf", arch="llama", dtype=dtype, reference=model if dtype == "float32" else None)
    assert info["max_abs_diff"] == (0.0 if dtype == "float32" else None)
    assert info["arch"] == "llama" and info["dtype"] == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    reference = model.to(getattr(torch, dtype)).float()  # what the GGUF holds: the weights rounded to dtype
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, reference(x).logits, rtol=0, atol=atol)


def test_gguf_refuses_factorised_layers_and_unnamed_tensors(tmp_path):
    from laser_export.architectures import family_for
    from laser_export.intervene import plan_targets, reduce_model
    from laser_export.recipe import Intervention

    model = tiny_model("llama")
    fam = family_for("llama")
    reduce_model(model, fam, plan_targets([Intervention(layer=1, matrix="fc_in", rank=2)], model.config, fam),
                 storage="factorised")
    with pytest.raises(GgufExportError, match="dense weights"):
        write_gguf(model, tmp_path / "f.gguf", arch="llama", dtype="float32")
    qwen = tiny_model("qwen2")  # q/k/v biases: written, but transformers' llama GGUF reader drops them
    with torch.no_grad():
        for m in qwen.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.5)
    with pytest.raises(GgufExportError, match="GGUF parity check failed"):
        write_gguf(qwen, tmp_path / "q.gguf", arch="llama", dtype="float32", reference=qwen)


def _recipe(tmp_path, source, **over):
    r = {"name": "g", "model": {"source": str(source)}, "storage": "dense",
         "interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1}], **over}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    return tmp_path / "r.yaml"


@pytest.mark.parametrize("over,message", [
    ({"storage": "factorised", "export": {"formats": ["safetensors", "gguf"]}}, "export.formats: gguf holds dense"),
    ({"export": {"formats": ["gguf"], "dtype": "float8"}}, "export.dtype: Input should be"),
])
def test_bad_gguf_or_dtype_recipe_fails_check(tmp_path, capsys, over, message):
    save_tiny("llama", tmp_path / "m")
    assert main(["check", str(_recipe(tmp_path, tmp_path / "m", **over))]) == 2
    assert message in capsys.readouterr().err


def test_gguf_for_a_family_without_gguf_arch_fails_check(tmp_path, capsys):
    save_tiny("gpt2", tmp_path / "m")
    recipe = _recipe(tmp_path, tmp_path / "m", export={"formats": ["safetensors", "gguf"]})
    assert main(["check", str(recipe)]) == 2
    assert "export.formats: GGUF export supports llama; not gpt2" in capsys.readouterr().err


def test_run_exports_float16_safetensors_and_gguf(tmp_path):
    save_tiny("llama", tmp_path / "m")
    recipe = _recipe(tmp_path, tmp_path / "m", export={"formats": ["safetensors", "gguf"], "dtype": "float16"})
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--no-progress"]) == 0
    header = read_safetensors_header(out / "model.safetensors")
    assert {t["dtype"] for t in header.values()} == {"F16"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export_dtype"] == "float16"
    (entry,) = manifest["matrices"]
    assert entry["bytes_dense"] == 64 * 32 * 2  # element size of the exported dtype
    assert manifest["gguf"]["file"] == "g.gguf" and manifest["gguf"]["dtype"] == "F16"
    assert manifest["gguf"]["tokenizer"] is False  # a transformers folder source has no GGUF vocabulary
    assert manifest["gguf"]["max_abs_diff"] <= 1e-5  # checked against the safetensors export during the run
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="g.gguf", dtype=torch.float32).eval()
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(gguf(x).logits, dense(x).logits, rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and "no tokenizer metadata" in card and "in float16." in card
    assert "measured in float32; the weights were then cast to **float16**" in card


@pytest.mark.slow
def test_smollm2_gguf_round_trip_keeps_the_tokenizer(smollm2_gguf, tmp_path):
    from transformers import AutoTokenizer

    from laser_export.export.gguf import gguf_quantization

    assert gguf_quantization(smollm2_gguf) == "Q4_1"
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    info = write_gguf(model, tmp_path / "s.gguf", arch="llama", dtype="float32", source_gguf=smollm2_gguf,
                      reference=model)
    assert info["tokenizer"] is True and info["max_abs_diff"] <= 1e-4
    assert gguf_quantization(tmp_path / "s.gguf") == "ALL_F32"
    text = "The capital of France is Paris; Wikidata says so."
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file="s.gguf")
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and len(ours) == len(theirs)
