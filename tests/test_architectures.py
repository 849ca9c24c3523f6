import json

import pytest
import torch

from laser_export.architectures import (
    FAMILIES,
    GROUPS,
    ArchitectureError,
    family_for,
    layer_modules,
    module_name,
    num_layers,
)
from laser_export.intervene import SVDCache, plan_targets, reduce_model
from laser_export.lowrank import LowRankLinear, as_matrix
from laser_export.recipe import Intervention, RecipeError, Reduction
from tinymodels import TINY, tiny_inputs, tiny_model


def test_every_family_has_a_tiny_model():
    covered = {family_for(mt).name for mt in TINY}
    assert covered == set(FAMILIES)


def test_every_family_file_is_loaded_and_named_after_its_file():
    from importlib import resources

    files = {f.name for f in resources.files("laser_export.families").iterdir() if f.name.endswith(".json")}
    assert files == {f"{name}.json" for name in FAMILIES}


def plain_pair(fam) -> list[str]:
    """Two aliases of whole linear modules (what the factorised form supports): fc_in/fc_out where the family
    has them as plain modules, else attention ones (MoE experts and fused row blocks are dense-only)."""
    from laser_export.architectures import is_fused

    return [a for a in ("fc_in", "fc_out", "o", "q", "k") if a in fam.matrices and not is_fused(fam, a)][:2]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_alias_resolves_to_a_linear_map(model_type):
    from laser_export.architectures import is_fused, num_experts
    from laser_export.intervene import Target, target_matrix

    model = tiny_model(model_type)
    fam = family_for(model.config.model_type)
    for alias in fam.matrices:
        for layer in range(num_layers(model.config)):
            n = num_experts(fam, alias, model.config)
            for expert in [None] if n is None else range(n):
                name, m = target_matrix(model, fam, Target(0, layer, alias, expert=expert))
                assert m.dim() == 2 and min(m.shape) >= (4 if alias == "router" else 8), (alias, m.shape)
            if is_fused(fam, alias):
                continue
            mod = model.get_submodule(module_name(model, fam, layer, alias))
            # the family's declared weight layout is the module's
            assert (type(mod).__name__ == "Conv1D") == (fam.weight_layout == "conv1d"), (alias, type(mod))


def test_a_family_file_whose_weight_layout_is_wrong_is_refused_naming_it():
    """weight_layout is data the package reads: a family file that declares the wrong layout is an error
    naming the file, never a silently transposed matrix."""
    from laser_export.architectures import ArchitectureError
    from laser_export.intervene import Target, target_matrix

    model = tiny_model("gpt2")
    fam = family_for("gpt2").model_copy(update={"weight_layout": "linear"})
    with pytest.raises(ArchitectureError, match=r"families/.*weight_layout is 'linear'.*Conv1D"):
        target_matrix(model, fam, Target(0, 0, "fc_in"))


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_family_capabilities_match_the_model(model_type):
    """auto_class builds the same class as the tiny model; task/pipeline_tag/scorers agree; the card
    says the pipeline tag and loads with the auto class."""
    import transformers

    from laser_export.export.card import render_card

    model = tiny_model(model_type)
    fam = family_for(model_type)
    auto = getattr(transformers, fam.auto_class)
    assert type(auto.from_config(model.config)) is type(model)
    assert fam.pipeline_tag == {"causal-lm": "text-generation", "masked-lm": "fill-mask"}[fam.task]
    assert ("masked" in fam.scorers) == (fam.task == "masked-lm") != ("causal" in fam.scorers)
    assert num_layers(model.config) == len(layer_modules(model, fam))
    if fam.final_norm:
        model.base_model.get_submodule(fam.final_norm)
    recipe = {"name": "t", "model": {"source": "x/y"}, "storage": "factorised", "interventions": [{"layer": 0, "matrix": "fc_in", "rho": 0.5}]}
    manifest = {"model": {"source": "x/y", "model_type": model_type, "architecture": fam.name}, "storage": "factorised", "matrices": []}
    card = str(render_card(recipe, "name: t\n", manifest, None))
    assert f"pipeline_tag: {fam.pipeline_tag}" in card
    assert f"from transformers import {fam.auto_class}" in card
    assert f"{fam.auto_class}.from_pretrained(" in card
    other = {"AutoModelForCausalLM", "AutoModelForMaskedLM"} - {fam.auto_class}
    assert not any(o in card for o in other)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_factorised_round_trip_every_family(tmp_path, model_type):
    """reduce (factorised) -> save -> from_pretrained with the family's auto class -> same logits."""
    import transformers

    from laser_export.export.safetensors import write_checkpoint
    from laser_export.policy import atomic_folder

    model = tiny_model(model_type)
    fam = family_for(model_type)
    a, b = plain_pair(fam)
    iv = [Intervention(layer=1, matrix=a, rho=0.25), Intervention(layer=2, matrix=b, rank=3)]
    entries = reduce_model(model, fam, plan_targets(iv, model.config, fam), storage="factorised")
    assert [e["storage"] for e in entries] == ["factorised", "factorised"]
    with atomic_folder(tmp_path / "out") as tmp:
        write_checkpoint(model, None, tmp)
    loaded = getattr(transformers, fam.auto_class).from_pretrained(tmp_path / "out").eval()
    for e in entries:
        assert isinstance(loaded.get_submodule(e["name"]), LowRankLinear)
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)


def test_family_files_are_validated():
    from laser_export.architectures import ArchitectureError, _read_family

    good = FAMILIES["llama"].model_dump(mode="json")
    with pytest.raises(ArchitectureError, match="bad.json: invalid family file.*auto_class"):
        _read_family(json.dumps({**good, "auto_class": "AutoModelForMaskedLM"}), "bad.json")
    with pytest.raises(ArchitectureError, match="unknown alias"):
        _read_family(json.dumps({**good, "matrices": {"gate": "mlp.gate_proj"}}), "bad.json")
    with pytest.raises(ArchitectureError, match="scorer"):
        _read_family(json.dumps({**good, "scorers": ["masked"]}), "bad.json")
    with pytest.raises(ArchitectureError, match="extra"):
        _read_family(json.dumps({**good, "extra": {}}), "bad.json")


def test_per_model_type_overrides():
    assert family_for("gemma3_text").layers == "layers"
    assert family_for("gemma3").layers == "language_model.layers"
    assert family_for("gemma3").final_norm == "language_model.norm"
    assert family_for("gemma3").name == family_for("gemma3_text").name == "gemma3"
    # GGUF export is tested for llama/mistral only; the other llama-family types override it off
    assert family_for("qwen2").gguf_arch is None and family_for("mistral").gguf_arch == "llama"


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("storage", ["dense", "factorised"])
def test_reduce_every_family(model_type, storage):
    model = tiny_model(model_type)
    fam = family_for(model.config.model_type)
    x = tiny_inputs()
    before = model(x).logits
    from laser_export.architectures import is_fused

    targets = plan_targets([Intervention(layer=1, matrix="mlp", rho=0.25)], model.config, fam)
    assert {t.alias for t in targets} == {a for a in GROUPS["mlp"] if a in fam.matrices}
    entries = reduce_model(model, fam, targets, storage=storage)
    after = model(x).logits
    assert not torch.allclose(before, after)
    for e in entries:
        if is_fused(fam, e["matrix"]):  # a block of a fused tensor: its factors kept (laser_export.fused)
            assert e["storage"] == storage and ("[" in e["name"])
        else:
            assert isinstance(model.get_submodule(e["name"]), LowRankLinear) == (e["storage"] == "factorised")
        assert e["rank"] == max(1, int(0.25 * min(e["shape"])))
        assert 0 < e["relative_error"] < 1


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_factorised_and_dense_give_identical_logits(model_type):
    x = tiny_inputs()
    logits = {}
    for storage in ("dense", "factorised"):
        model = tiny_model(model_type)
        fam = family_for(model.config.model_type)
        a, b = plain_pair(fam)
        iv = [Intervention(layer=2, matrix=a, rho=0.2), Intervention(layer=0, matrix=b, rank=3)]
        entries = reduce_model(model, fam, plan_targets(iv, model.config, fam), storage=storage)
        assert all(e["storage"] == storage for e in entries)
        logits[storage] = model(x).logits
    torch.testing.assert_close(logits["dense"], logits["factorised"], rtol=0, atol=1e-5)


def test_rho_one_leaves_weights_bit_identical():
    model = tiny_model("llama")
    fam = family_for("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entries = reduce_model(model, fam, plan_targets([Intervention(layer=0, matrix="attn", rho=1.0)], model.config, fam))
    assert len(entries) == 4 and all(e["frobenius_error"] == 0 for e in entries)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_svd_cache_computes_each_matrix_once():
    model = tiny_model("llama")
    fam = family_for("llama")
    cache = SVDCache(Reduction())

    for rho in (0.1, 0.5):
        m = tiny_model("llama")
        reduce_model(m, fam, plan_targets([Intervention(layer=1, matrix="fc_in", rho=rho)], m.config, fam), cache=cache)
    assert len(cache) == 1


def test_errors_name_the_field():
    model = tiny_model("llama")
    fam = family_for("llama")
    ivs = [
        Intervention(layer=0, matrix="fc_in", rho=0.1),
        Intervention(layer=3, matrix="fc_in", rho=0.1),
        Intervention(layer=1, matrix="c_fc", rho=0.1),
        Intervention(layer=0, matrix="mlp", rho=0.1),
    ]
    with pytest.raises(RecipeError) as info:
        plan_targets(ivs, model.config, fam)
    msg = str(info.value)
    assert "interventions[1].layer: model has 3 layers (0..2), got 3" in msg
    assert "interventions[2].matrix: llama has no matrix 'c_fc'" in msg
    assert "interventions[3]: layer 0 fc_in is already reduced by interventions[0]" in msg


def test_rank_larger_than_matrix_is_refused_before_any_change():
    model = tiny_model("gpt2")
    fam = family_for("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = plan_targets(
        [Intervention(layer=0, matrix="fc_in", rho=0.5), Intervention(layer=1, matrix="qkv", rank=33)], model.config, fam
    )
    with pytest.raises(RecipeError, match=r"interventions\[1\].rank: .* max rank 32, got 33"):
        reduce_model(model, fam, targets)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gpt2_fused_qkv_hint_and_unknown_architecture():
    with pytest.raises(ArchitectureError, match="fused in c_attn: use qkv"):
        from laser_export.architectures import expand_matrix

        expand_matrix(family_for("gpt2"), "q")
    with pytest.raises(ArchitectureError, match="unknown architecture 'mamba'"):
        family_for("mamba")


def test_apply_undo_cache_budget_and_error_from_singular_values():
    import math

    import torch

    from laser_export.intervene import Target, apply
    from laser_export.lowrank import as_matrix

    model = tiny_model("llama")
    fam = family_for("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = [Target(0, 0, "fc_in", 0.25), Target(1, 1, "fc_out", 0.5)]
    cache = SVDCache(Reduction(), max_bytes=0)
    applied = apply(model, targets, family=fam, storage="factorised", cache=cache)
    assert len(cache) == 0  # max_bytes=0: nothing kept between matrices
    for e, t in zip(applied.entries, targets):
        name = e["name"]
        w = before[name + ".weight"].double()
        s = torch.linalg.svdvals(w)
        k = e["rank"]
        assert e["frobenius_error"] == pytest.approx(math.sqrt(float((s[k:] ** 2).sum())), rel=1e-6)
        assert e["relative_error"] == pytest.approx(e["frobenius_error"] / float(w.norm()), rel=1e-6)
    applied()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # a byte-budget LRU keeps the most recent decompositions only
    lru = SVDCache(Reduction(), max_bytes=1)
    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]
    for n in names:
        lru.get(n, as_matrix(model.get_submodule(n)), 4)
    assert names[1] in lru and names[0] not in lru and len(lru) == 1
