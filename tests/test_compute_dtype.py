"""model.compute_dtype: float16 weights computed in float32 on a CPU, weights kept (and exported) exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from laser_export import compute_dtype
from tinymodels import tiny_inputs, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("model_type", ["gptj", "llama"])
def test_fp16_weights_compute_in_fp32_exactly_and_stay_fp16(model_type):
    model = tiny_model(model_type).half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = tiny_model(model_type).half().float()  # the same fp16 values, held in float32
    x = tiny_inputs()
    assert compute_dtype.install(model, torch.float32) > 0
    with torch.no_grad():
        got = model(x).logits
        want = reference(x).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())
    compute_dtype.remove(model)
    with torch.no_grad():
        assert model(x).logits.dtype == torch.float16


@pytest.mark.parametrize("model_type", ["gptj", "llama"])
def test_big_linears_compute_block_by_block_and_embeddings_cast_only_their_rows(model_type, monkeypatch):
    """The compute-dtype copy of a big Linear (GPT-J's lm_head: 0.83 GB in float32) is one block of rows at a time,
    an embedding's only the rows it returns: same logits as the float32 model (blocks are whole output features:
    each logit is the same dot product, up to the summation order), weights still fp16, and the modules' own
    forward after remove()."""
    monkeypatch.setattr(compute_dtype, "BIG_LINEAR", 0)  # every Linear blocked, in blocks of 7 rows
    monkeypatch.setattr(compute_dtype, "BLOCK_ROWS", 7)
    model = tiny_model(model_type).half()
    reference = tiny_model(model_type).half().float()
    x = tiny_inputs()
    compute_dtype.install(model, torch.float32)
    assert any("forward" in m.__dict__ for m in model.modules())
    casts = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: (casts.append(tuple(t.shape)), real(t, *a, **k))[1])
    with torch.no_grad():
        got = model(x).logits
    monkeypatch.setattr(torch.Tensor, "to", real)
    whole = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
             and m.weight.shape[0] > 7}
    assert not whole & set(casts), whole & set(casts)  # no whole matrix or embedding table was cast
    with torch.no_grad():  # float32 either way; the blocks only change the BLAS's summation order (last bits)
        torch.testing.assert_close(got, reference(x).logits, rtol=0, atol=1e-5)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    compute_dtype.remove(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert model(x).logits.dtype == torch.float16


def test_resolve_auto_and_explicit():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    dtype, note = compute_dtype.resolve("auto", torch.float16, cpu)
    assert dtype == torch.float32 and "float16 on a CPU" in note and "\n" not in note
    assert compute_dtype.resolve("auto", torch.bfloat16, cpu) == (torch.bfloat16, None)
    assert compute_dtype.resolve("auto", torch.float16, cuda) == (torch.float16, None)
    dtype, note = compute_dtype.resolve("float16", torch.float16, cpu)
    assert dtype == torch.float16 and "slower" in note
    assert compute_dtype.resolve("bfloat16", torch.float16, cpu) == (torch.bfloat16, None)


def _recipe(tmp_path, **model_extra):
    if not (tmp_path / "m").exists():
        tiny_model("llama").half().save_pretrained(tmp_path / "m")
        tiny_tokenizer().save_pretrained(tmp_path / "m")
    words = [f"w{i}" for i in range(4, 100)]
    with open(tmp_path / "bench.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"{words[i % 90]} {words[(3 * i + 1) % 90]}", "answer": words[(i * 11) % 90]}) + "\n")
    recipe = tmp_path / f"r{len(model_extra)}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"source": str(tmp_path / "m"), "dtype": "float16", "device": "cpu", **model_extra},
        "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.25}], "storage": "factorised",
        "benchmark": {"name": "jsonl", "path": str(tmp_path / "bench.jsonl"), "validation_fraction": 0.25,
                      "batch_size": 4},
        "claims": {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5}},
    }))
    return recipe


def test_verify_fp16_on_cpu_says_so_and_records_the_compute_dtype(tmp_path, capsys):
    from laser_export.cli import main

    assert main(["verify", str(_recipe(tmp_path)), "--report", str(tmp_path / "a.json"), "--no-progress",
                 "--no-cache"]) in (0, 1)
    out = capsys.readouterr().err
    assert "float16 on a CPU" in " ".join(out.split())
    auto = json.loads((tmp_path / "a.json").read_text())
    assert auto["dtype"] == {"weights": "float16", "compute": "float32"}
    assert main(["verify", str(_recipe(tmp_path, compute_dtype="float16")), "--report", str(tmp_path / "b.json"),
                 "--no-progress", "--no-cache"]) in (0, 1)
    native = json.loads((tmp_path / "b.json").read_text())
    assert native["dtype"] == {"weights": "float16", "compute": "float16"}
    # same weights, same reduction; scores may differ only at fp16 rounding level on this tiny model
    assert auto["interventions"] == native["interventions"]
