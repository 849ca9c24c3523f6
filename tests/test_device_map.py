"""A model dispatched by accelerate (device_map over CPU and disk offload): reduction, undo and the
prefix cache behave exactly as on a plain model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from laser_export.architectures import family_for
from laser_export.intervene import SVDCache, Target, apply
from laser_export.prefix import PrefixCache
from laser_export.recipe import Reduction
from tinymodels import save_tiny, tiny_inputs

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture()
def models(tmp_path):
    save_tiny("llama", tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=DEVICE_MAP,
                                                      offload_folder=str(tmp_path / "offload")).eval()
    assert dispatched.model.layers[1].mlp.gate_proj.weight.device.type == "meta"  # really offloaded
    return plain, dispatched


@pytest.mark.parametrize("storage", ["dense", "factorised"])
def test_apply_and_undo_on_an_offloaded_model(models, storage):
    plain, disp = models
    fam, x = family_for("llama"), tiny_inputs()
    with torch.no_grad():
        before = disp(x).logits
        targets = [Target(0, 1, "fc_in", 0.25), Target(1, 2, "fc_out", 0.25), Target(2, 0, "q", 0.5)]
        red_d = apply(disp, targets, family=fam, storage=storage, cache=SVDCache(Reduction()))
        red_p = apply(plain, targets, family=fam, storage=storage, cache=SVDCache(Reduction()))
        assert red_d.entries == red_p.entries
        torch.testing.assert_close(disp(x).logits, plain(x).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(disp(x).logits, before)
        red_d()
        red_p()
        assert torch.equal(disp(x).logits, before)


def _logits(out):
    """Logits from a capture/replay forward_fn: lazy (materialize) or already a tensor."""
    return out.materialize() if hasattr(out, "materialize") else out


def test_prefix_cache_replay_on_an_offloaded_model(models):
    plain, disp = models
    fam = family_for("llama")
    x = tiny_inputs(batch=3, seq=6)
    mask, pos = torch.ones_like(x), torch.arange(x.shape[1])[None].expand_as(x)
    cache = PrefixCache(disp, fam, 1, lazy_capture=True)
    with torch.no_grad():
        # the first captured batch runs the full forward (it checks that replay is exact): plain logits
        base = _logits(cache.capture(disp, x, mask, pos))
        torch.testing.assert_close(base, plain(x).logits, rtol=0, atol=1e-5)
        undo = apply(disp, [Target(0, 1, "fc_in", 0.25)], family=fam, storage="factorised")
        replayed = _logits(cache.replay(1)(disp, x, mask, pos))
        torch.testing.assert_close(replayed, disp(x).logits, rtol=0, atol=1e-5)
        undo()


def test_verify_with_a_device_map_matches_the_plain_run(tmp_path):
    import json

    import yaml

    from laser_export.cli import main

    save_tiny("llama", tmp_path / "m")
    words = [f"w{i}" for i in range(4, 100)]
    with open(tmp_path / "bench.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"{words[i % 90]} {words[(3 * i + 1) % 90]}", "answer": words[(i * 11) % 90]}) + "\n")
    reports = []
    for i, extra in enumerate([{}, {"device_map": DEVICE_MAP, "offload_folder": str(tmp_path / "off")}]):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "tiny", "model": {"source": str(tmp_path / "m"), **extra},
            "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.25}], "storage": "factorised",
            "benchmark": {"name": "jsonl", "path": str(tmp_path / "bench.jsonl"), "validation_fraction": 0.25,
                          "batch_size": 4},
            "claims": {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5}},
        }))
        main(["verify", str(recipe), "--report", str(tmp_path / f"rep{i}.json"), "--no-progress"])
        reports.append(json.loads((tmp_path / f"rep{i}.json").read_text()))
    plain, disp = reports
    assert disp["metrics"] == plain["metrics"] and disp["interventions"] == plain["interventions"]


def test_prefix_cache_keeps_hidden_states_only_at_replay_layers():
    from laser_export.prefix import PrefixCacheError
    from tinymodels import tiny_model

    model, fam = tiny_model("llama"), family_for("llama")
    x = tiny_inputs(batch=2, seq=5)
    mask, pos = torch.ones_like(x), torch.arange(x.shape[1])[None].expand_as(x)
    full = PrefixCache(model, fam, 1, lazy_capture=True)
    lean = PrefixCache(model, fam, 1, lazy_capture=True, replay_layers=[1])
    with torch.no_grad():
        full.capture(model, x, mask, pos)
        lean.capture(model, x, mask, pos)
        assert lean.nbytes() < full.nbytes()
        torch.testing.assert_close(lean.replay(1)(model, x, mask, pos).materialize(),
                                   full.replay(1)(model, x, mask, pos).materialize(), rtol=0, atol=0)
    with pytest.raises(PrefixCacheError, match="not cached"):
        lean.replay(2)
