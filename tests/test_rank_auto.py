"""``rank: auto``: the number of singular values above the Marchenko–Pastur edge, in recipes (run/apply
in memory and streamed, check) and in search (``--rhos auto``)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from laser_export.cli import main
from laser_export.lowrank import auto_rank, mp_edge, singular_values
from laser_export.recipe import parse_recipe
from tinymodels import save_tiny


def _planted(m=96, n=160, k=6, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    signal = U @ torch.diag(torch.linspace(3.0, 1.5, k, dtype=torch.float64)) @ V.T
    return signal + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def test_auto_rank_finds_the_planted_rank():
    w = _planted()
    found = auto_rank(singular_values(w), tuple(w.shape))
    assert found.rank == 6
    # the noise estimate is the entry std of the noise (MP scale), within a few percent
    assert abs(found.noise_std - 0.02) / 0.02 < 0.1
    assert found.edge == pytest.approx(found.noise_std * (96 ** 0.5 + 160 ** 0.5))


def test_pure_noise_keeps_one_and_gram_route_matches_lapack():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(600, 700, generator=g, dtype=torch.float64)  # > 512: Gram route
    S_gram = singular_values(w)
    S_ref = torch.linalg.svdvals(w)
    assert torch.allclose(S_gram, S_ref, rtol=1e-9, atol=1e-9)
    assert auto_rank(S_gram, (600, 700)).rank <= 2  # noise: (almost) nothing above the edge
    s, edge = mp_edge(S_ref, (600, 700))
    assert abs(s - 1.0) < 0.02 and abs(S_ref[0] / edge - 1) < 0.03


def test_recipe_accepts_auto_and_refuses_other_strings():
    base = {"name": "a", "model": {"source": "x"}}
    ok = parse_recipe({**base, "interventions": [{"layer": 0, "matrix": "fc_in", "rank": "auto"}]})
    assert ok.interventions[0].rank == "auto"
    with pytest.raises(Exception, match=r"interventions\[0\].rank: expected a positive integer or auto"):
        parse_recipe({**base, "interventions": [{"layer": 0, "matrix": "fc_in", "rank": "automatic"}]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    model = save_tiny("llama", root / "model")
    # plant a rank-3 structure in layer 1's gate_proj so the auto rank is not trivially 1
    with torch.no_grad():
        w = model.model.layers[1].mlp.gate_proj.weight
        w.copy_(_planted(*w.shape, k=3, noise=0.01, seed=3).float())
    model.save_pretrained(root / "model")
    return root


def _recipe(root, path, **over):
    r = {"name": "tiny-auto", "model": {"source": str(root / "model")},
         "interventions": [{"layer": 1, "matrix": "fc_in", "rank": "auto"}, {"layer": 2, "matrix": "fc_out", "rho": 0.5}],
         "storage": "factorised", **over}
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.parametrize("how", ["--in-memory", "stream"])
def test_apply_records_auto_rank_and_edge(tiny, tmp_path, how):
    recipe = _recipe(tiny, tmp_path / "r.yaml")
    assert main(["check", str(recipe)]) == 0
    out = tmp_path / "out"
    args = ["apply", str(recipe), "--out", str(out), "--no-progress"] + ([how] if how.startswith("--") else [])
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["matrices"] if e["layer"] == 1)
    assert entry["rank"] == 3 and entry["rank_rule"] == "marchenko-pastur" and entry["mp_edge"] > 0
    from safetensors.torch import load_file

    w = load_file(str(tiny / "model" / "model.safetensors"))["model.layers.1.mlp.gate_proj.weight"]
    expect = auto_rank(singular_values(w), tuple(w.shape))
    assert entry["mp_edge"] == pytest.approx(expect.edge, rel=1e-9)
    card = (out / "README.md").read_text()
    assert "MP edge" in card


def test_search_rhos_auto(tiny, tmp_path):
    from laser_export.architectures import family_for
    from laser_export.search import parse_rhos, run_search
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from laser_export.benchmarks import load_split

    data = tmp_path / "b.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}"}) + "\n" for i in range(12)))
    val = load_split("jsonl", path=data, seed=0, validation_fraction=0.5).validation
    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    assert parse_rhos("0.5,auto") == [0.5, "auto"]
    res = run_search(model, tok, family_for("llama"), val, layers=[1], matrices=["fc_in"], rhos=parse_rhos("0.5,auto"),
                     batch_size=4, compose=1, progress=False)
    auto = next(r for r in res.candidates if r["rho"] == "auto")
    assert auto["rank"] == 3 and "rho" in auto
