"""transformers.js (Node) loads laser-export's ONNX folders from local disk and generates.

A tiny Llama is exported by ``laser-export run`` with ONNX in float32 and in float16, each with the 8-bit
``model_quantized.onnx``; transformers.js (``@huggingface/transformers``, run by ``tests/js/
transformers_js_generate.cjs`` with ``env.allowRemoteModels = false``) loads each folder with its default dtype
(fp32 in Node: ``onnx/model.onnx``), ``dtype: 'fp16'`` (``onnx/model_fp16.onnx``) and ``dtype: 'q8'``
(``onnx/model_quantized.onnx``), generates greedily and returns the last position's logits, compared with the
exported model in PyTorch.

Slow; skipped when ``node`` or the npm package is absent. The package is looked up under the npm prefix
``$LASER_EXPORT_TRANSFORMERS_JS`` (default ``~/.cache/laser-export/transformers-js``), installed with
``ONNXRUNTIME_NODE_INSTALL=skip npm install --prefix ~/.cache/laser-export/transformers-js @huggingface/transformers``
(the CPU onnxruntime-node binaries are in the npm package; ``skip`` avoids its CUDA download from nuget.org).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tinymodels import save_tiny

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "js" / "transformers_js_generate.cjs"
PREFIX = Path(os.environ.get("LASER_EXPORT_TRANSFORMERS_JS", "~/.cache/laser-export/transformers-js")).expanduser()
NODE = shutil.which("node")
PROMPT, NEW = "w5 w6 w7", 5

if NODE is None:
    pytest.skip("node is not installed", allow_module_level=True)
if not (PREFIX / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
    pytest.skip(f"@huggingface/transformers is not installed under {PREFIX} (see this file's docstring)",
                allow_module_level=True)
pytest.importorskip("onnxruntime", reason="onnxruntime is needed for the ONNX export")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from laser_export.cli import main

    root = tmp_path_factory.mktemp("tjs")
    save_tiny("llama", root / "llama")
    for dtype in ("float32", "float16"):
        recipe = root / f"{dtype}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": f"tjs-{dtype}", "model": {"source": str(root / "llama")},
            "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
            "export": {"formats": ["safetensors", "onnx"], "dtype": dtype, "onnx_quantized": True},
        }))
        assert main(["run", str(recipe), "--out", str(root / "models" / dtype), "--no-progress"]) == 0
    return root / "models"


def _js(models: Path, name: str, dtype: str) -> dict:
    res = subprocess.run([NODE, str(SCRIPT), str(PREFIX), str(models), name, dtype, PROMPT, str(NEW)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    data = np.array(out["logits"])
    if out["logits_type"] == "float16":  # transformers.js hands fp16 tensors out as their raw 16-bit patterns
        data = data.astype(np.uint16).view(np.float16)
    out["logits"] = data.astype(np.float64)
    return out


def _torch(folder: Path):
    """(greedy ids, last-position logits) of the exported checkpoint in PyTorch, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        logits = model(ids).logits[0, -1].double().numpy()
    return gen[0].tolist(), logits


@pytest.mark.parametrize("export_dtype, js_dtype, file_dtype", [
    ("float32", "default", "float32"),  # Node's default: fp32, onnx/model.onnx
    ("float16", "fp16", "float16"),     # onnx/model_fp16.onnx
    ("float32", "q8", "float32"),       # onnx/model_quantized.onnx (8-bit weights, float logits)
    ("float16", "q8", "float32"),
])
def test_transformers_js_loads_the_export_and_generates_like_torch(exports, export_dtype, js_dtype, file_dtype):
    ref_ids, ref_logits = _torch(exports / export_dtype)
    got = _js(exports, export_dtype, js_dtype)
    assert got["logits_type"] == file_dtype  # the file the dtype names was loaded
    diff = float(np.abs(got["logits"] - ref_logits).max())
    scale = float(np.abs(ref_logits).max())
    if js_dtype == "default":
        assert diff <= 1e-4, diff  # the fp32 graph: onnxruntime's parity tolerance
    elif js_dtype == "fp16":
        assert diff <= 0.01 * scale + 1e-3, (diff, scale)  # fp16: 1% of the largest |logit| (README, ONNX)
    else:
        assert diff <= 0.1 * scale, (diff, scale)  # 8-bit weights: a quantization error, not a broken graph
    assert got["ids"][:3] == ref_ids[:3] and len(got["ids"]) > 3  # the prompt, then generated tokens
    if js_dtype != "q8":
        assert got["ids"] == ref_ids  # greedy tokens equal torch's
