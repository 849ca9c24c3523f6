"""The search's swaps go through intervene.apply, one SVD per matrix for every ρ (issue 9)."""

from __future__ import annotations

import torch

from laser_export import intervene
from laser_export.architectures import family_for
from laser_export.intervene import SVDCache
from laser_export.search import Candidate, Swapper

from tinymodels import tiny_model


def test_swapper_reduces_through_apply_with_one_svd_per_matrix(monkeypatch):
    model, fam = tiny_model("llama"), family_for("llama")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calls, applied = [], []
    real_svd, real_apply = intervene.compute_svd, intervene.apply
    monkeypatch.setattr(intervene, "compute_svd", lambda m, **k: calls.append(k["rank"]) or real_svd(m, **k))
    monkeypatch.setattr(intervene, "apply", lambda *a, **k: applied.append(k) or real_apply(*a, **k))
    swap = Swapper(model, fam, SVDCache(), "dense")
    w = model.model.layers[1].mlp.gate_proj.weight
    for rho in (0.1, 0.5, 0.9, 0.2):  # a larger rank after a smaller one: still the same decomposition
        undo = swap.apply([Candidate(1, "fc_in", rho)])
        assert not torch.equal(w, before["model.layers.1.mlp.gate_proj.weight"])
        undo()
    assert calls == [min(w.shape)]  # one full decomposition, served to every ρ
    assert len(applied) == 4 and all(k["full_svd"] and k["cache"] is swap.svd for k in applied)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
