"""`laser-export search --per-expert` (issue 17): each expert of an MoE alias is its own candidate (by default
a candidate (layer, alias, ρ) reduces every expert of that layer together); the recipe names the experts."""

from __future__ import annotations

import json

import pytest
import torch

from laser_export.architectures import family_for
from laser_export.intervene import SVDCache
from laser_export.search.grid import Candidate, candidate_id
from laser_export.search.sweep import Swapper
from tinymodels import tiny_model

KEY = "model.layers.1.mlp.experts.gate_up_proj"


def test_a_per_expert_candidate_reduces_that_expert_only_and_undoes():
    model, fam = tiny_model("mixtral"), family_for("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap = Swapper(model, fam, SVDCache(), "dense")
    assert swap.experts("fc_in") == [0, 1, 2, 3] and swap.experts("o") == [None]
    c = Candidate(1, "fc_in", 0.25, 2)
    undo = swap.apply([c])
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [KEY]
    changed = [e for e in range(4) if not torch.equal(before[KEY][e], after[KEY][e])]
    assert changed == [2]
    undo()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    together = Candidate(1, "fc_in", 0.25)
    undo = swap.apply([together])
    assert all(not torch.equal(before[KEY][e], model.state_dict()[KEY][e]) for e in range(4))
    undo()


def test_per_expert_candidates_have_their_own_ids_interventions_and_auto_ranks():
    model, fam = tiny_model("mixtral"), family_for("mixtral")
    swap = Swapper(model, fam, SVDCache(), "dense")
    c, all_ = Candidate(1, "fc_in", 0.25, 3), Candidate(1, "fc_in", 0.25)
    assert c.key == "L1.fc_in[e3].rho0.25" and all_.key == "L1.fc_in.rho0.25"
    assert candidate_id(c, 8) == "L1.fc_in.e3.k8" != candidate_id(all_, 8)
    assert c.as_intervention() == {"layer": 1, "matrix": "fc_in", "rho": 0.25, "experts": [3]}
    assert all_.as_intervention() == {"layer": 1, "matrix": "fc_in", "rho": 0.25}
    assert c.site == all_.site and c.unit != all_.unit
    autos = {swap.rank(Candidate(1, "fc_in", "auto", e)) for e in range(4)}
    assert all(1 <= k <= 32 for k in autos)
    from laser_export.intervene import Target  # the auto rank of expert e comes from expert e's matrix
    t = swap.targets(0, 1, "fc_in", "auto", expert=2)
    assert len(t) == 1 and isinstance(t[0], Target) and t[0].expert == 2


@pytest.mark.slow  # a tiny search: 8 candidates, a composition and the test pass (~10-20 s on 2 busy cores)
def test_search_per_expert_writes_a_recipe_naming_the_experts(tmp_path):
    from laser_export import cli
    from laser_export.recipe import load_recipe
    from test_search import _write_jsonl
    from tinymodels import save_tiny

    folder, out = tmp_path / "model", tmp_path / "found.yaml"
    save_tiny("mixtral", folder)
    bench = _write_jsonl(tmp_path / "bench.jsonl")
    argv = ["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(bench),
            "--layers", "2", "--matrices", "fc_in,fc_out", "--rhos", "0.1", "--batch-size", "4",
            "--validation-fraction", "0.5", "--compose", "2", "--per-expert", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    assert sorted((c["matrix"], tuple(c["experts"])) for c in sweep["candidates"]) == [
        (m, (e,)) for m in ("fc_in", "fc_out") for e in range(4)]
    assert len({json.dumps(c["metrics"], sort_keys=True) for c in sweep["candidates"]}) > 1
    recipe, _ = load_recipe(out)
    assert recipe.interventions and all(len(iv.experts) == 1 for iv in recipe.interventions)
    assert "experts: [" in out.read_text()  # one line per intervention, e.g. {layer: 2, matrix: fc_in, rho: 0.1, experts: [3]}
    assert cli.main(["check", str(out)]) == 0
