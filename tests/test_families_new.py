"""The families added for issue 17 (OLMo-2, Granite, SmolLM3, ModernBERT, Phi-3, Mixtral, Qwen3-MoE) through
the paths the shared family tests in test_architectures.py do not cover: streaming `apply` equal to the
in-memory export, the factorised export loaded by the shipped remote code without laser-export, and `check`
refusing ONNX for a family whose data file says ``onnx: false``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

from laser_export.architectures import family_for
from laser_export.cli import main
from laser_export.runner import ApplyOptions, apply
from tinymodels import checkpoint_tensors, save_tiny, tiny_inputs

PLAIN = ["olmo2", "granite", "smollm3"]


def _recipe(path: Path, source: Path, storage: str, ivs, **extra) -> Path:
    path.write_text(yaml.safe_dump({"name": "tiny-new", "model": {"source": str(source)}, "interventions": ivs,
                                    "storage": storage, **extra}))
    return path




def _auto(model_type):
    return getattr(transformers, family_for(model_type).auto_class)


IVS = [{"layer": 1, "matrix": "fc_in", "rho": 0.25}, {"layer": 2, "matrix": "fc_out", "rank": 3}]


@pytest.mark.parametrize("model_type", PLAIN)
@pytest.mark.parametrize("storage", ["dense", "factorised"])
def test_streamed_apply_equals_in_memory_and_loads_back(tmp_path, model_type, storage):
    model = save_tiny(model_type, tmp_path / "src")
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "src", storage, IVS)
    mem = apply(ApplyOptions(recipe, out=tmp_path / "mem", in_memory=True, progress=False)).manifest
    st = apply(ApplyOptions(recipe, out=tmp_path / "st", progress=False)).manifest
    assert mem["streamed"] is False and st["streamed"] is True
    assert mem["matrices"] == st["matrices"] and {e["storage"] for e in st["matrices"]} == {storage}
    a, b = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "st")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = tiny_inputs()
    with torch.no_grad():
        reloaded = _auto(model_type).from_pretrained(tmp_path / "st").eval()(x).logits
        assert not torch.allclose(reloaded, model(x).logits)


NEW = PLAIN + ["phi3", "modernbert", "mixtral", "qwen3_moe"]


@pytest.mark.slow  # 40-80 s each on 2 busy cores
@pytest.mark.parametrize("model_type", NEW)
def test_onnx_export_of_a_reduced_model_passes_parity(tmp_path, model_type):
    """transformers' exporter (torch.onnx, dynamo) handles every new family: a reduced model (factorised
    modules where the family has plain ones, dense row blocks / experts otherwise) matches onnxruntime on the
    padded batch, one decoding step with past, and on texts other than the traced ones."""
    from laser_export.architectures import is_fused
    from laser_export.export.onnx import check_onnx_parity, export_onnx
    from laser_export.intervene import plan_targets, reduce_model
    from laser_export.recipe import Intervention
    from test_onnx import TEXTS, char_tokenizer
    from tinymodels import tiny_model

    assert family_for(model_type).onnx is True
    model, fam = tiny_model(model_type), family_for(model_type)
    ivs = [Intervention(layer=1, matrix="fc_in", rho=0.25), Intervention(layer=2, matrix="o", rank=3)]
    storage = "dense" if is_fused(fam, "fc_in") else "factorised"
    reduce_model(model, fam, plan_targets(ivs, model.config, fam), storage=storage)
    result = export_onnx(model, char_tokenizer(), tmp_path, sample_texts=TEXTS)
    assert result["passed"] is True and result["max_abs_diff"] < 1e-4
    other = ["zzz qqq xx 99 !!", "The quick brown fox jumps over the lazy dog again", "k", "Mm, 42 - yes? no."]
    again = check_onnx_parity(model, char_tokenizer(), tmp_path / "model.onnx", sample_texts=other)
    assert again["passed"] is True


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
    from cleanenv import make_clean_venv

    return make_clean_venv(tmp_path_factory.mktemp("venv") / "v")


def remote_logits(clean_python, folder: Path, auto_class: str, x: torch.Tensor, cwd: Path) -> np.ndarray:
    """Logits of ``folder`` loaded with trust_remote_code=True in a Python without laser-export."""
    from cleanenv import run_clean

    npy = cwd / "x.npy"
    np.save(npy, x.numpy())
    code = (
        "import numpy, torch, transformers, sys\n"
        f"m = transformers.{auto_class}.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        "assert 'laser_export' not in sys.modules\n"
        f"x = torch.from_numpy(numpy.load({str(npy)!r}))\n"
        "with torch.no_grad():\n"
        f"    numpy.save({str(cwd / 'out.npy')!r}, m(x).logits.numpy())\n"
        "print('LOADED', type(m).__name__)\n"
    )
    res = run_clean(clean_python, code, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED Laser" in res.stdout
    return np.load(cwd / "out.npy")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", PLAIN)
def test_remote_code_loads_the_factorised_export(tmp_path, clean_python, model_type):
    save_tiny(model_type, tmp_path / "src")
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "src", "factorised", IVS)
    apply(ApplyOptions(recipe, out=tmp_path / "out", in_memory=True, progress=False))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]
    x = tiny_inputs()
    with torch.no_grad():
        expected = _auto(model_type).from_pretrained(tmp_path / "out").eval()(x).logits.numpy()
    got = remote_logits(clean_python, tmp_path / "out", family_for(model_type).auto_class, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# ---- ModernBERT: a masked LM whose MLP input and q/k/v are fused -------------------------------------------------
def test_modernbert_batched_masked_scores_equal_batch_size_one():
    from laser_export.evaluate import score_masked
    from test_masked import _examples
    from tinymodels import tiny_mlm_tokenizer, tiny_model

    model, tok = tiny_model("modernbert"), tiny_mlm_tokenizer()
    ex = _examples()
    one = score_masked(model, tok, ex, batch_size=1, progress=False)
    many = score_masked(model, tok, ex, batch_size=5, progress=False)
    for a, b in zip(one.per_example, many.per_example):
        assert a["id"] == b["id"]
        for k in ("top1", "top5", "top10", "accuracy", "prediction"):
            assert a.get(k) == b.get(k), (a["id"], k)
        assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-4)
    for k, v in one.metrics.items():
        assert many.metrics[k] == pytest.approx(v, abs=1e-5)
    assert len({r["predicted_token"] for r in one.per_example if "predicted_token" in r}) > 1


@pytest.mark.parametrize("model_type, alias, module, rows", [
    ("phi3", "fc_in", "mlp.gate_up_proj", (0, 64)),
    ("phi3", "fc_up", "mlp.gate_up_proj", (64, 128)),
    ("phi3", "k", "self_attn.qkv_proj", (32, 48)),  # 4 query heads, 2 kv heads of 8: q 0:32, k 32:48, v 48:64
    ("modernbert", "fc_in", "mlp.Wi", (0, 64)),
    ("modernbert", "v", "attn.Wqkv", (64, 96)),
])
def test_a_row_block_is_reduced_alone(model_type, alias, module, rows):
    """Only the alias's rows of the fused matrix change; they become the exact rank-k SVD of that block."""
    from laser_export.architectures import family_for
    from laser_export.intervene import plan_targets, reduce_model
    from laser_export.recipe import Intervention
    from tinymodels import tiny_model

    model = tiny_model(model_type)
    fam = family_for(model_type)
    name = f"model.layers.1.{module}.weight"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entries = reduce_model(model, fam, plan_targets([Intervention(layer=1, matrix=alias, rank=3)], model.config, fam))
    (e,) = entries
    assert e["name"] == f"{name}[{rows[0]}:{rows[1]}]" and e["rank"] == 3 and e["storage"] == "dense"
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [name]
    a, b = rows
    w = after[name]
    assert torch.equal(w[:a], before[name][:a]) and torch.equal(w[b:], before[name][b:])
    U, S, Vh = torch.linalg.svd(before[name][a:b].double(), full_matrices=False)
    torch.testing.assert_close(w[a:b].double(), (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-5)
    assert e["frobenius_error"] == pytest.approx(float(S[3:].pow(2).sum().sqrt()), rel=1e-6)


@pytest.mark.parametrize("model_type", ["phi3", "modernbert"])
def test_fused_families_export_dense_and_load_back(tmp_path, model_type):
    """`apply` of a recipe naming row blocks: streamed (laser_export/stream_fused.py), dense, loads back with the
    same logits."""
    model = save_tiny(model_type, tmp_path / "src")
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "src", "dense",
                     [{"layer": 1, "matrix": "mlp", "rho": 0.25}, {"layer": 2, "matrix": "attn", "rank": 3}])
    manifest = apply(ApplyOptions(recipe, out=tmp_path / "out", progress=False)).manifest
    assert manifest["streamed"] is True
    assert {e["matrix"] for e in manifest["matrices"]} == {"fc_in", "fc_up", "fc_out", "q", "k", "v", "o"}
    from laser_export.intervene import plan_targets, reduce_model
    from laser_export.recipe import Intervention

    fam = family_for(model_type)
    reduce_model(model, fam, plan_targets([Intervention(layer=1, matrix="mlp", rho=0.25),
                                           Intervention(layer=2, matrix="attn", rank=3)], model.config, fam))
    x = tiny_inputs()
    with torch.no_grad():
        loaded = _auto(model_type).from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["phi3", "modernbert", "mixtral"])
def test_check_accepts_factorised_storage_of_a_fused_alias(tmp_path, capsys, model_type):
    """Fused blocks have a factorised form (tests/test_moe_factorised.py); `check` passes such a recipe."""
    save_tiny(model_type, tmp_path / "src")
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "src", "factorised",
                     [{"layer": 0, "matrix": "o", "rank": 3}, {"layer": 1, "matrix": "fc_in", "rank": 3}])
    assert main(["check", str(recipe)]) == 0, capsys.readouterr().err
