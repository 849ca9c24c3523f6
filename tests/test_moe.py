"""Mixture-of-Experts: per-expert LASER on transformers 5's fused expert tensors (Mixtral, Qwen3-MoE).

``mlp.experts.gate_up_proj`` is [experts, 2·intermediate, hidden] (gate rows, then up rows) and
``mlp.experts.down_proj`` [experts, hidden, intermediate]; fc_in/fc_up/fc_out of layer ℓ mean one matrix
per selected expert, each reduced on its own."""

from __future__ import annotations

import pytest
import torch

from laser_export.architectures import family_for
from laser_export.intervene import SVDCache, apply, plan_targets, reduce_model
from laser_export.recipe import Intervention, RecipeError
from tinymodels import tiny_inputs, tiny_model

MOE = ["mixtral", "qwen3_moe"]
E, I, H = 4, 48, 32


def _plan(model, fam, *ivs):
    return plan_targets([Intervention(**iv) for iv in ivs], model.config, fam)


@pytest.mark.parametrize("model_type", MOE)
def test_selected_experts_are_reduced_each_on_its_own(model_type):
    model, fam = tiny_model(model_type), family_for(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entries = reduce_model(model, fam, _plan(model, fam, dict(layer=1, matrix="fc_in", rank=5, experts=[1, 3])))
    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert [(e["expert"], e["name"], e["shape"], e["rank"]) for e in entries] == [
        (1, f"{key}[1][0:{I}]", [I, H], 5), (3, f"{key}[3][0:{I}]", [I, H], 5)]
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [key]  # router, up rows, down: untouched
    for e in range(E):
        old, new = before[key][e], after[key][e]
        assert torch.equal(new[I:], old[I:])  # the up rows of every expert
        if e in (0, 2):
            assert torch.equal(new, old)
            continue
        U, S, Vh = torch.linalg.svd(old[:I].double(), full_matrices=False)
        torch.testing.assert_close(new[:I].double(), (U[:, :5] * S[:5]) @ Vh[:5], rtol=0, atol=1e-5)
        entry = entries[[1, 3].index(e)]
        assert entry["frobenius_error"] == pytest.approx(float(S[5:].pow(2).sum().sqrt()), rel=1e-6)


@pytest.mark.parametrize("model_type", MOE)
def test_all_experts_by_default_router_only_when_named(model_type):
    model, fam = tiny_model(model_type), family_for(model_type)
    router = "model.layers.2.mlp.gate.weight"
    r0 = model.state_dict()[router].clone()
    entries = reduce_model(model, fam, _plan(model, fam, dict(layer=2, matrix="mlp", rho=0.5)))
    assert sorted((e["matrix"], e["expert"]) for e in entries) == sorted(
        (a, x) for a in ("fc_in", "fc_up", "fc_out") for x in range(E))
    assert torch.equal(model.state_dict()[router], r0)
    (e,) = reduce_model(model, fam, _plan(model, fam, dict(layer=2, matrix="router", rank=2)))
    assert e["name"] == router and e["shape"] == [E, H] and "expert" not in e
    assert not torch.equal(model.state_dict()[router], r0)
    s = torch.linalg.svdvals(model.state_dict()[router].double())
    assert s[2] < 1e-5 * s[0] < s[1]  # rank 2 (float32 round-off)


@pytest.mark.parametrize("model_type", MOE)
def test_svd_memory_is_bounded_by_one_expert(model_type, monkeypatch):
    """Every decomposition sees one expert's block, never the fused [E, 2I, H] tensor."""
    import laser_export.intervene as iv

    shapes = []
    real = iv.compute_svd

    def spy(matrix, **kw):
        shapes.append(tuple(matrix.shape))
        return real(matrix, **kw)

    monkeypatch.setattr(iv, "compute_svd", spy)
    model, fam = tiny_model(model_type), family_for(model_type)
    reduce_model(model, fam, _plan(model, fam, dict(layer=0, matrix="mlp", rank=4)))
    assert sorted(set(shapes)) == [(H, I), (I, H)] and len(shapes) == 3 * E


@pytest.mark.parametrize("model_type", MOE)
def test_undo_is_bit_exact_and_cache_keys_are_per_expert(model_type):
    model, fam = tiny_model(model_type), family_for(model_type)
    x = tiny_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x).logits
    cache = SVDCache()
    applied = apply(model, _plan(model, fam, dict(layer=1, matrix="fc_out", rank=3)), family=fam, cache=cache)
    assert len(cache) == E and not torch.allclose(model(x).logits, base)
    applied()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_expert_selection_errors_name_the_field():
    model, fam = tiny_model("mixtral"), family_for("mixtral")
    with pytest.raises(RecipeError) as info:
        _plan(model, fam, dict(layer=0, matrix="fc_in", rank=2, experts=[0, 4]),
              dict(layer=0, matrix="q", rank=2, experts=[1]),
              dict(layer=1, matrix="fc_out", rank=2, experts=[2]), dict(layer=1, matrix="fc_out", rank=2))
    msg = str(info.value)
    assert "interventions[0].experts: the model has 4 experts (0..3), got [4]" in msg
    assert "interventions[1].experts: q of mixtral has no experts" in msg
    assert "interventions[3]: layer 1 fc_out expert 2 is already reduced by interventions[2]" in msg
    with pytest.raises(ValueError, match="distinct"):
        Intervention(layer=0, matrix="fc_in", rank=2, experts=[1, 1])
    with pytest.raises(ValueError):
        Intervention(layer=0, matrix="fc_in", rank=2, experts="some")
    with pytest.raises(RecipeError, match=r"interventions\[0\].experts: fc_in of llama has no experts"):
        llama = tiny_model("llama")
        _plan(llama, family_for("llama"), dict(layer=0, matrix="fc_in", rank=2, experts=[0]))


@pytest.mark.parametrize("model_type", MOE)
def test_dense_export_of_experts_loads_back_with_the_same_logits(tmp_path, model_type):
    """run/apply (streamed: per expert, in the source's per-expert layout), read back with the same logits."""
    import yaml
    from transformers import AutoModelForCausalLM

    from laser_export.runner import ApplyOptions, apply as run_apply
    from tinymodels import save_tiny

    model = save_tiny(model_type, tmp_path / "src")
    ivs = [{"layer": 2, "matrix": "fc_in", "rho": 0.25}, {"layer": 1, "matrix": "fc_out", "rank": 3, "experts": [0, 2]}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "moe", "model": {"source": str(tmp_path / "src")},
                                                     "interventions": ivs, "storage": "dense"}))
    manifest = run_apply(ApplyOptions(tmp_path / "r.yaml", out=tmp_path / "out", progress=False)).manifest
    assert manifest["streamed"] is True
    assert [(e["layer"], e["matrix"], e["expert"]) for e in manifest["matrices"]] == [
        (2, "fc_in", x) for x in range(E)] + [(1, "fc_out", 0), (1, "fc_out", 2)]
    fam = family_for(model_type)
    reduce_model(model, fam, plan_targets([Intervention(**iv) for iv in ivs], model.config, fam))
    x = tiny_inputs()
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "phi3"])
def test_search_sweeps_an_moe_layer_with_all_experts_together(tmp_path, model_type):
    """`laser-export search` on fused families: a candidate (layer, fc_in, ρ) reduces every expert's matrix
    (MoE) or the row block (Phi-3); the model is unchanged afterwards and the written recipe checks."""
    from laser_export import cli
    from laser_export.recipe import load_recipe
    from test_search import _write_jsonl
    from tinymodels import save_tiny

    folder, out = tmp_path / "model", tmp_path / "found.yaml"
    save_tiny(model_type, folder)
    bench = _write_jsonl(tmp_path / "bench.jsonl")
    argv = ["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(bench),
            "--layers", "1-2", "--matrices", "fc_in", "--rhos", "0.1,0.5", "--batch-size", "4",
            "--validation-fraction", "0.5", "--compose", "1", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    import json

    sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    assert len(sweep["candidates"]) == 4
    assert len({json.dumps(c["metrics"], sort_keys=True) for c in sweep["candidates"]}) > 1  # candidates differ
    recipe, _ = load_recipe(out)
    assert recipe.interventions[0].matrix == "fc_in"
    assert cli.main(["check", str(out)]) == 0


def test_an_offloaded_fused_tensor_is_refused_with_its_name():
    from torch import nn

    from laser_export.architectures import ArchitectureError

    model, fam = tiny_model("mixtral"), family_for("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, device="meta"))  # what a device_map offload leaves
    with pytest.raises(ArchitectureError, match=r"interventions\[0\]: .*layers\.0\.mlp\.experts\.gate_up_proj\[0\]\[0:48\] is offloaded"):
        reduce_model(model, fam, _plan(model, fam, dict(layer=0, matrix="fc_in", rank=2)))


def test_check_summarises_moe_sites_with_their_expert_count(tmp_path, capsys, monkeypatch):
    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tiny("mixtral", tmp_path / "src")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "name": "moe", "model": {"source": str(tmp_path / "src")}, "storage": "dense",
        "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.5}, {"layer": 2, "matrix": "fc_out", "rank": 2, "experts": [3]}]}))
    assert main(["check", str(tmp_path / "r.yaml")]) == 0
    assert "mixtral, 5 matrices (L1.fc_in[4 experts], L2.fc_out[1 expert]), checked against the model config" in capsys.readouterr().err
    # a Hub model not in the cache: the hints stand in, the expert count is unknown until the config is there
    from pathlib import Path

    laserxtral = Path(__file__).parent.parent / "recipes" / "mixtral-8x7b-laserxtral.yaml"
    assert main(["check", str(laserxtral)]) == 0
    assert "4 sites (L28.fc_in[all experts], L29.fc_in[all experts]" in capsys.readouterr().err
