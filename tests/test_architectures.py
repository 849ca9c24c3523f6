import pytest
import torch

from laser_export.architectures import FAMILIES, GROUPS, ArchitectureError, family_for, module_name
from laser_export.intervene import SVDCache, plan_targets, reduce_model
from laser_export.lowrank import LowRankLinear, as_matrix
from laser_export.recipe import Intervention, RecipeError, Reduction
from tinymodels import TINY, tiny_inputs, tiny_model


def test_every_family_has_a_tiny_model():
    covered = {family_for(mt).name for mt in TINY}
    assert covered == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_alias_resolves_to_a_linear_map(model_type):
    model = tiny_model(model_type)
    fam = family_for(model.config.model_type)
    for alias in fam.matrices:
        for layer in range(model.config.num_hidden_layers):
            mod = model.get_submodule(module_name(model, fam, layer, alias))
            m = as_matrix(mod)
            assert m.dim() == 2 and min(m.shape) >= 8, (alias, m.shape)


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("storage", ["dense", "factorised"])
def test_reduce_every_family(model_type, storage):
    model = tiny_model(model_type)
    fam = family_for(model.config.model_type)
    x = tiny_inputs()
    before = model(x).logits
    targets = plan_targets([Intervention(layer=1, matrix="mlp", rho=0.25)], model.config, fam)
    assert {t.alias for t in targets} == {a for a in GROUPS["mlp"] if a in fam.matrices}
    entries = reduce_model(model, fam, targets, storage=storage)
    after = model(x).logits
    assert not torch.allclose(before, after)
    for e in entries:
        mod = model.get_submodule(e["name"])
        assert isinstance(mod, LowRankLinear) == (e["storage"] == "factorised")
        assert e["rank"] == max(1, int(0.25 * min(e["shape"])))
        assert 0 < e["relative_error"] < 1


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_factorised_and_dense_give_identical_logits(model_type):
    x = tiny_inputs()
    logits = {}
    for storage in ("dense", "factorised"):
        model = tiny_model(model_type)
        fam = family_for(model.config.model_type)
        iv = [Intervention(layer=2, matrix="fc_in", rho=0.2), Intervention(layer=0, matrix="fc_out", rank=3)]
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
