"""ONNX in the export dtype (fp16 runs in onnxruntime, bf16 is refused), the 8-bit quantized file transformers.js
loads by default, and the ``transformers.js_config`` entries a > 2 GB model needs."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from laser_export.export import onnx as onnx_export
from laser_export.export.onnx import (
    FP16_RELATIVE_TOLERANCE,
    OnnxExportError,
    export_onnx,
    transformers_js_config,
    write_transformers_js_config,
)
from test_onnx import TEXTS, char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    model = tiny_llama().to(torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # logits well away from 0: a visible scale for the relative tolerance
    info = export_onnx(model, char_tokenizer(), out, sample_texts=TEXTS, quantized=True)
    return model, out, info


def test_fp16_export_runs_in_onnxruntime_in_fp16(fp16_export):
    model, out, info = fp16_export
    assert model.dtype == torch.float16  # the model is handed back in its own dtype
    assert info["file"] == "model_fp16.onnx" and info["dtype"] == "float16" and info["passed"]
    m = onnx.load(str(out / "model_fp16.onnx"))
    assert {onnx.TensorProto.DataType.Name(i.data_type) for i in m.graph.initializer if i.dims} >= {"FLOAT16"}
    past = [i for i in m.graph.input if i.name.startswith("past_key_values.")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in past)
    # tolerance: 1% of the largest |logit|, measured against torch fp32 on the same (fp16-rounded) weights
    assert info["tolerance"] == pytest.approx(max(1e-4, FP16_RELATIVE_TOLERANCE * info["max_abs_logit"]))
    assert 0 < info["max_abs_diff"] <= info["tolerance"]
    assert not (out / "model.onnx").exists() and not (out / ".fp32-for-quantization").exists()


def test_quantized_file_is_8_bit_and_its_parity_is_recorded(fp16_export):
    _, out, info = fp16_export
    q = info["quantized"]
    assert q["file"] == "model_quantized.onnx" and (out / "model_quantized.onnx").is_file()
    m = onnx.load(str(out / "model_quantized.onnx"))
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul") for n in m.graph.node)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in m.graph.initializer)
    assert 0 < q["max_abs_diff"] < q["max_abs_logit"]  # measured: quantization error, not a broken graph
    assert info["transformers_js_config"] == {"dtype": "fp16", "kv_cache_dtype": {"fp16": "float16"}}


def test_bfloat16_is_refused_with_the_reason(tmp_path):
    with pytest.raises(OnnxExportError, match="bfloat16 ONNX does not run in onnxruntime's CPU provider"):
        export_onnx(tiny_llama().to(torch.bfloat16), char_tokenizer(), tmp_path, sample_texts=TEXTS)


def test_transformers_js_config_names_external_data_and_merges_into_config(tmp_path):
    info = {"file": "model.onnx", "dtype": "float32", "external_data": "model.onnx_data",
            "quantized": {"file": "model_quantized.onnx", "external_data": "model_quantized.onnx_data"}}
    assert transformers_js_config(info) == {
        "use_external_data_format": {"model.onnx": True, "model_quantized.onnx": True}}
    assert transformers_js_config({"file": "model.onnx", "dtype": "float32", "external_data": None}) == {}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_transformers_js_config(tmp_path, info)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["transformers.js_config"]["use_external_data_format"]["model.onnx"] is True


@pytest.mark.slow
def test_quantized_file_of_a_large_model_keeps_its_weights_in_onnx_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)  # exercise the > 2 GB layout
    info = export_onnx(tiny_llama(), char_tokenizer(), tmp_path, sample_texts=TEXTS, quantized=True)
    assert info["external_data"] == "model.onnx_data" and info["quantized"]["external_data"] == \
        "model_quantized.onnx_data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.onnx_data", "model_quantized.onnx", "model_quantized.onnx_data"]
    assert info["transformers_js_config"]["use_external_data_format"] == {
        "model.onnx": True, "model_quantized.onnx": True}
    assert info["quantized"]["max_abs_diff"] < info["quantized"]["max_abs_logit"]


@pytest.mark.slow  # an end-to-end CLI run (export + ONNX/push/full forwards): run by .ci/run's slow suite
def test_run_writes_fp16_and_quantized_onnx_and_the_transformers_js_config(tmp_path):
    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    save_tiny("llama", tmp_path / "m")
    recipe = {"name": "o", "model": {"source": str(tmp_path / "m")}, "storage": "dense",
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
              "export": {"formats": ["safetensors", "onnx"], "dtype": "float16", "onnx_quantized": True}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main([str(tmp_path / "r.yaml"), "--out", str(out), "--no-progress"]) == 0
    onnx_entry = json.loads((out / "manifest.json").read_text())["onnx"]
    assert onnx_entry["file"] == "onnx/model_fp16.onnx" and onnx_entry["dtype"] == "float16" and onnx_entry["passed"]
    assert onnx_entry["quantized"]["file"] == "onnx/model_quantized.onnx"
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model_fp16.onnx", "model_quantized.onnx"]
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": "fp16", "kv_cache_dtype": {"fp16": "float16"}}


def test_bfloat16_onnx_recipe_fails_check(tmp_path, capsys):
    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    save_tiny("llama", tmp_path / "m")
    recipe = {"name": "o", "model": {"source": str(tmp_path / "m")},
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
              "export": {"formats": ["safetensors", "onnx"], "dtype": "bfloat16"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "r.yaml")]) == 2
    assert "bfloat16 ONNX does not run in onnxruntime's CPU provider" in capsys.readouterr().err
