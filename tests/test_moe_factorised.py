"""Factorised storage of fused blocks (issue 17): one expert's matrix of an MoE's fused expert tensor
(Mixtral, Qwen3-MoE ``mlp.experts.gate_up_proj`` / ``down_proj``) or a row block of a fused 2-D weight
(Phi-3 ``gate_up_proj`` / ``qkv_proj``) stored as thin factors (see :mod:`laser_export.fused`).

The export loads through the Auto class with laser-export imported (its quantizer) and, slow, with the
shipped remote code in a Python without laser-export; both give the dense export's logits and both refuse a
checkpoint whose factors are missing or mis-shaped (also with ``ignore_mismatched_sizes=True``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from laser_export.architectures import family_for
from laser_export.export.safetensors import checkpoint_tensor_bytes
from laser_export.intervene import apply as apply_targets, plan_targets, reduce_model
from laser_export.recipe import Intervention
from laser_export.runner import ApplyOptions, apply
from tinymodels import checkpoint_tensors, save_tiny, tiny_inputs, tiny_model

FAMILIES = ["mixtral", "qwen3_moe", "phi3"]


def _ivs(model_type: str) -> list[dict]:
    if model_type == "phi3":  # a row block of gate_up_proj (all layers' fc_in) and one of qkv_proj
        return [{"layer": 2, "matrix": "fc_in", "rank": 4}, {"layer": 1, "matrix": "k", "rank": 3}]
    return [{"layer": 2, "matrix": "fc_in", "rank": 4}, {"layer": 1, "matrix": "fc_out", "rank": 3, "experts": [0, 2]}]


def _export(tmp_path: Path, model_type: str, storage: str) -> dict:
    recipe = tmp_path / f"{storage}.yaml"
    recipe.write_text(yaml.safe_dump({"name": "fused", "model": {"source": str(tmp_path / "src")},
                                      "interventions": _ivs(model_type), "storage": storage}))
    return apply(ApplyOptions(recipe, out=tmp_path / storage, progress=False)).manifest


def _reference(model, model_type: str, storage: str = "dense"):
    fam = family_for(model_type)
    reduce_model(model, fam, plan_targets([Intervention(**iv) for iv in _ivs(model_type)], model.config, fam),
                 storage=storage)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(model_type, folder) of a tiny model's dense and factorised exports (made once per family)."""
    tmp = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, tmp / "src")
    manifests = {s: _export(tmp, request.param, s) for s in ("dense", "factorised")}
    return request.param, tmp, manifests


def test_factorised_export_records_each_block_and_loads_with_the_dense_logits(exported):
    model_type, tmp, manifests = exported
    entries = manifests["factorised"]["matrices"]
    assert {e["storage"] for e in entries} == {"factorised"} and all(e["bytes_saved"] > 0 for e in entries)
    dense_entries = manifests["dense"]["matrices"]
    assert [(e["name"], e["rank"], e.get("expert")) for e in entries] == [
        (e["name"], e["rank"], e.get("expert")) for e in dense_entries]
    if model_type != "phi3":
        assert [e["expert"] for e in entries] == [0, 1, 2, 3, 0, 2]  # one entry per expert matrix
    saved = manifests["factorised"]["totals"]["bytes_saved"]
    assert saved == sum(e["bytes_saved"] for e in entries)
    qc = json.loads((tmp / "factorised" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "laser" and len(qc["fused"]) == 2
    # the checkpoint is smaller by at least the factorised blocks' saving (fp32 tiny model)
    assert checkpoint_tensor_bytes(tmp / "dense") - checkpoint_tensor_bytes(tmp / "factorised") >= saved
    x = tiny_inputs()
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tmp / "dense").eval()(x).logits
        fact = AutoModelForCausalLM.from_pretrained(tmp / "factorised").eval()(x).logits
        original = AutoModelForCausalLM.from_pretrained(tmp / "src").eval()(x).logits
    assert not torch.allclose(dense, original, atol=1e-4)  # the reduction changes the model
    torch.testing.assert_close(fact, dense, rtol=0, atol=1e-5)


def test_in_memory_factorised_model_equals_the_loaded_one_bit_exactly(exported):
    """In memory a factorised block holds the product of its stored factors: what the checkpoint loads."""
    model_type, tmp, _ = exported
    mem = _reference(tiny_model(model_type), model_type, "factorised")
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "factorised")
    a, b = mem.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_undo_of_factorised_blocks_is_bit_exact_and_drops_their_factors():
    from laser_export.fused import fused_records

    model, fam = tiny_model("mixtral"), family_for("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = plan_targets([Intervention(layer=1, matrix="fc_in", rank=3, experts=[1, 2])], model.config, fam)
    applied = apply_targets(model, targets, family=fam, storage="factorised")
    rec = fused_records(model)
    assert [(b["expert"], b["rank"]) for b in rec["model.layers.1.mlp.experts.gate_up_proj"]["blocks"]] == [(1, 3), (2, 3)]
    applied()
    assert fused_records(model) == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_factorised_source_reduced_again_keeps_only_the_factors_that_still_hold(exported):
    """A factorised export loaded as a model: its blocks keep their factors (a later factorised export writes
    them again) until a block is reduced again, which drops that block's factors (the undo puts them back)."""
    from laser_export.fused import fused_records

    model_type, tmp, _ = exported
    model, fam = AutoModelForCausalLM.from_pretrained(tmp / "factorised"), family_for(model_type)
    first = fused_records(model)
    assert first == json.loads((tmp / "factorised" / "config.json").read_text())["quantization_config"]["fused"]
    again = Intervention(**{**_ivs(model_type)[1], "rank": 2})  # layer 1's blocks (one tensor), again, dense
    applied = apply_targets(model, plan_targets([again], model.config, fam), family=fam, storage="dense")
    after = fused_records(model)
    layer1 = [n for n in first if ".layers.1." in n]
    assert len(layer1) == 1 and layer1[0] not in after  # its blocks were all reduced again: no factors left
    assert after == {n: r for n, r in first.items() if n != layer1[0]}  # layer 2's keep theirs
    applied()
    assert fused_records(model) == first


@pytest.mark.parametrize("model_type, ivs, auto", [
    ("modernbert", [{"layer": 1, "matrix": "fc_in", "rank": 4}, {"layer": 2, "matrix": "v", "rank": 3}], "AutoModelForMaskedLM"),
    ("mixtral", [{"layer": 1, "matrix": "router", "rank": 1}], "AutoModelForCausalLM"),
])
def test_masked_lm_row_blocks_and_the_router_factorise_too(tmp_path, model_type, ivs, auto):
    import transformers

    save_tiny(model_type, tmp_path / "src")
    logits = {}
    for storage in ("dense", "factorised"):
        recipe = tmp_path / f"{storage}.yaml"
        recipe.write_text(yaml.safe_dump({"name": "x", "model": {"source": str(tmp_path / "src")},
                                          "interventions": ivs, "storage": storage}))
        manifest = apply(ApplyOptions(recipe, out=tmp_path / storage, progress=False)).manifest
        assert {e["storage"] for e in manifest["matrices"]} == {storage}
        with torch.no_grad():
            logits[storage] = getattr(transformers, auto).from_pretrained(tmp_path / storage).eval()(tiny_inputs()).logits
    torch.testing.assert_close(logits["factorised"], logits["dense"], rtol=0, atol=1e-5)


def test_factorised_svd_and_load_work_one_expert_at_a_time(monkeypatch, tmp_path):
    """Every decomposition of a factorised MoE reduction sees one expert's block; the loader rebuilds the fused
    tensor block by block without a float64 temporary of the whole tensor."""
    import laser_export.intervene as iv

    shapes, wide = [], []
    real_svd, real_to = iv.compute_svd, torch.Tensor.to

    def spy(matrix, **kw):
        shapes.append(tuple(matrix.shape))
        return real_svd(matrix, **kw)

    monkeypatch.setattr(iv, "compute_svd", spy)
    model, fam = tiny_model("mixtral"), family_for("mixtral")
    targets = plan_targets([Intervention(layer=0, matrix="mlp", rank=4)], model.config, fam)
    entries = reduce_model(model, fam, targets, storage="factorised")
    assert sorted(set(shapes)) == [(32, 48), (48, 32)] and len(shapes) == 12
    assert {e["storage"] for e in entries} == {"factorised"}

    def to_spy(self, *args, **kw):  # any cast to float64 of a tensor larger than one expert's matrix
        out = real_to(self, *args, **kw)
        if out.dtype == torch.float64 and out.numel() > 48 * 32:
            wide.append(tuple(self.shape))
        return out

    from laser_export.fused import assemble_fused, fused_records, prepare_fused, stored_form

    with stored_form(model) as fused:
        stored = {k: v.detach().clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(torch.Tensor, "to", to_spy)
    fresh = tiny_model("mixtral", seed=1)
    prepare_fused(fresh, fused)
    fresh.load_state_dict(stored, strict=True)
    assemble_fused(fresh, fused)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert wide == [] and fused_records(fresh) == fused
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_a_block_whose_factors_would_not_save_bytes_stays_dense():
    model, fam = tiny_model("mixtral"), family_for("mixtral")  # 48x32: factors save bytes below rank 19
    targets = plan_targets([Intervention(layer=0, matrix="fc_in", rank=20, experts=[0])], model.config, fam)
    entries = reduce_model(model, fam, targets, storage="factorised")
    assert entries[0]["storage"] == "dense" and entries[0]["bytes_saved"] == 0


def _tamper(folder: Path, key: str, new: torch.Tensor | None) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    assert key in tensors, sorted(tensors)
    if new is None:
        del tensors[key]
    else:
        tensors[key] = new
    save_file(tensors, str(f), metadata={"format": "pt"})


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _a_factor(model_type: str) -> str:
    if model_type == "phi3":
        return "model.layers.1.self_attn.qkv_proj.weight_laser_r32_48"
    return "model.layers.1.mlp.experts.down_proj_laser_e2_r0_32"


@pytest.mark.parametrize("ignore", [False, True])
def test_tampered_or_missing_factors_are_refused(exported, tmp_path, ignore):
    model_type, tmp, _ = exported
    stem = _a_factor(model_type)
    left = load_file(str(tmp / "factorised" / "model.safetensors"))[stem + "_left"]
    short = _copy(tmp / "factorised", tmp_path / "short")
    _tamper(short, stem + "_left", left[:, :-1].contiguous())  # one rank fewer than recorded
    with pytest.raises(ValueError, match=rf"{stem}_left has shape \[{left.shape[0]}, {left.shape[1] - 1}\]"):
        AutoModelForCausalLM.from_pretrained(short, ignore_mismatched_sizes=ignore)
    gone = _copy(tmp / "factorised", tmp_path / "gone")
    _tamper(gone, stem + "_right", None)
    with pytest.raises(ValueError, match=rf"{stem}_right is missing"):
        AutoModelForCausalLM.from_pretrained(gone, ignore_mismatched_sizes=ignore)


def test_a_dense_fused_tensor_under_a_factorised_record_is_refused(exported, tmp_path):
    """A checkpoint re-saved dense (whole fused tensor) while its config still records factorised blocks."""
    model_type, tmp, _ = exported
    dense = load_file(str(tmp / "dense" / "model.safetensors"))
    bad = _copy(tmp / "factorised", tmp_path / "bad")
    name = next(iter(json.loads((bad / "config.json").read_text())["quantization_config"]["fused"]))
    stored = load_file(str(bad / "model.safetensors"))
    stored[name] = torch.zeros(tuple(tiny_model(model_type).get_parameter(name).shape))
    save_file(stored, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert dense  # the dense export exists (its layout is transformers' own)
    with pytest.raises(ValueError, match="quantization_config.fused needs"):
        AutoModelForCausalLM.from_pretrained(bad)


# ---- the shipped remote code, in a Python without laser-export --------------------------------------------------
@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
    from cleanenv import make_clean_venv

    return make_clean_venv(tmp_path_factory.mktemp("venv") / "v")


REMOTE = """
import numpy, sys, torch, transformers
x = torch.from_numpy(numpy.load({x!r}))
try:  # first, before the remote code registers the loader: plain transformers stops on the remainder's shape
    transformers.AutoModelForCausalLM.from_pretrained({good!r})
    print('PLAIN LOADED')
except Exception as err:
    print('PLAIN REFUSED', type(err).__name__)
m = transformers.AutoModelForCausalLM.from_pretrained({good!r}, trust_remote_code=True).eval()
assert 'laser_export' not in sys.modules and type(m).__name__.startswith('Laser')
with torch.no_grad():
    numpy.save({out!r}, m(x).logits.numpy())
for ignore in (False, True):
    try:
        transformers.AutoModelForCausalLM.from_pretrained({bad!r}, trust_remote_code=True,
                                                          ignore_mismatched_sizes=ignore)
        print('TAMPERED LOADED')
    except Exception as err:
        print('REFUSED', type(err).__name__, str(err)[:300])
"""


@pytest.mark.slow  # a clean venv and two subprocess loads per family
def test_remote_code_loads_the_factorised_export_and_refuses_a_tampered_one(exported, tmp_path, clean_python):
    from cleanenv import run_clean

    model_type, tmp, _ = exported
    stem = _a_factor(model_type)
    bad = _copy(tmp / "factorised", tmp_path / "bad")
    left = load_file(str(bad / "model.safetensors"))[stem + "_left"]
    _tamper(bad, stem + "_left", left[:, :-1].contiguous())
    x = tiny_inputs()
    np.save(tmp_path / "x.npy", x.numpy())
    code = REMOTE.format(x=str(tmp_path / "x.npy"), good=str(tmp / "factorised"), bad=str(bad),
                         out=str(tmp_path / "out.npy"))
    res = run_clean(clean_python, code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("REFUSED LaserLoadError") == 2 and "TAMPERED" not in res.stdout, res.stdout
    assert "PLAIN REFUSED" in res.stdout and "PLAIN LOADED" not in res.stdout, res.stdout
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tmp / "dense").eval()(x).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), dense, rtol=0, atol=1e-5)


# ---- streaming apply of fused tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["dense", "factorised"])
def test_streamed_apply_of_fused_blocks_equals_the_in_memory_export(exported, tmp_path, storage):
    """Shard by shard, one block at a time: the same tensors (names, dtypes, values), manifest entries and
    quantization_config as the export of the model loaded whole."""
    model_type, tmp, _ = exported
    recipe = tmp_path / "r.yaml"
    ivs = _ivs(model_type) + [{"layer": 0, "matrix": "o", "rank": 3}]  # and a whole module (LowRankLinear)
    recipe.write_text(yaml.safe_dump({"name": "fused", "model": {"source": str(tmp / "src")},
                                      "interventions": ivs, "storage": storage}))
    mem = apply(ApplyOptions(recipe, out=tmp_path / "mem", in_memory=True, progress=False)).manifest
    st = apply(ApplyOptions(recipe, out=tmp_path / "st", progress=False)).manifest
    assert mem["streamed"] is False and st["streamed"] is True
    assert mem["matrices"] == st["matrices"] and {e["storage"] for e in st["matrices"]} == {storage}
    a, b = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "st")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    qc = [json.loads((tmp_path / f / "config.json").read_text()).get("quantization_config") for f in ("mem", "st")]
    assert (qc[0] or {}).get("fused") == (qc[1] or {}).get("fused") and (qc[0] is None) == (storage == "dense")
    with torch.no_grad():
        x = tiny_inputs()
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()(x).logits,
                                   AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()(x).logits,
                                   rtol=0, atol=1e-5)  # the weights are equal (above); the loads' round-off differs


@pytest.mark.slow  # a clean venv and a subprocess load
def test_remote_code_loads_a_factorised_modernbert_export(tmp_path, clean_python):
    """ModernBERT (masked LM, fused Wqkv / Wi row blocks) factorised: the shipped remote code loads it through
    AutoModelForMaskedLM in a Python without laser-export, with the dense export's logits."""
    import transformers
    from cleanenv import run_clean

    save_tiny("modernbert", tmp_path / "src")
    ivs = [{"layer": 1, "matrix": "fc_in", "rank": 4}, {"layer": 2, "matrix": "v", "rank": 3}]
    for storage in ("dense", "factorised"):
        (tmp_path / f"{storage}.yaml").write_text(yaml.safe_dump({"name": "x", "model": {"source": str(tmp_path / "src")},
                                                                  "interventions": ivs, "storage": storage}))
        apply(ApplyOptions(tmp_path / f"{storage}.yaml", out=tmp_path / storage, progress=False))
    x = tiny_inputs()
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import numpy, sys, torch, transformers
m = transformers.AutoModelForMaskedLM.from_pretrained({str(tmp_path / 'factorised')!r}, trust_remote_code=True).eval()
assert 'laser_export' not in sys.modules, 'laser_export imported'
print('CLASS', type(m).__name__)
with torch.no_grad():
    numpy.save({str(tmp_path / 'out.npy')!r}, m(torch.from_numpy(numpy.load({str(tmp_path / 'x.npy')!r}))).logits.numpy())
"""
    res = run_clean(clean_python, code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CLASS Laser" in res.stdout, res.stdout
    with torch.no_grad():
        dense = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "dense").eval()(x).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), dense, rtol=0, atol=1e-5)
