"""The offline default recipe on the real SmolLM2-135M-Instruct GGUF, end to end (slow: ~1 min)."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from laser_export.cli import main
from laser_export.pipeline import load_model, plan, reduce_loaded
from laser_export.recipe import load_recipe, parse_recipe

pytestmark = pytest.mark.slow


def test_default_recipe_end_to_end_factorised(smollm2_gguf, tmp_path):
    recipe, _ = load_recipe("recipes/smollm2-wikidataqa.yaml")
    data = recipe.model_dump(mode="json", exclude_none=True)
    data.pop("claims", None)
    data["export"]["formats"] = ["safetensors"]  # ONNX parity is covered by tests/test_onnx.py
    data["storage"] = "factorised"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "export"
    assert main([str(path), "--out", str(out), "--no-progress"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["model_type"] == "llama" and len(manifest["matrices"]) == len(recipe.interventions)
    for e, iv in zip(manifest["matrices"], recipe.interventions):
        m, n = e["shape"]
        k = max(1, int(iv.rho * min(m, n) + 1e-9)) if iv.rho else iv.rank
        assert e["rank"] == k and e["layer"] == iv.layer
        assert e["bytes_saved"] == (m * n - k * (m + n)) * 4

    # the in-memory reduced model and the exported one give the same logits
    p = plan(parse_recipe(data), "")
    loaded = reduce_loaded(p, load_model(p), progress=False)
    tok = loaded.tokenizer
    ids = tok(["The capital of France is", "The mother tongue of Danielle Darrieux is"], return_tensors="pt", padding=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a = loaded.model(**ids).logits
        b = reloaded(**ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert type(reloaded.get_submodule(manifest["matrices"][0]["name"])).__name__ == "LowRankLinear"
