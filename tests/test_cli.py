"""The CLI end to end on a tiny local model and a JSONL benchmark: check, verify, run, errors."""

import json

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from laser_export.cli import main
from tinymodels import save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    save_tiny("llama", root / "model")
    with open(root / "bench.jsonl", "w") as f:
        for i in range(40):
            a, b, c = WORDS[i % 90], WORDS[(3 * i + 1) % 90], WORDS[(7 * i + 2) % 90]
            f.write(json.dumps({"prompt": f"{a} {b} {c}", "answer": WORDS[(i * 11) % 90]}) + "\n")
    return root


def _recipe(ws, path, **over):
    r = {
        "name": "tiny",
        "model": {"source": str(ws / "model"), "license": "apache-2.0"},
        "interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1}],
        "storage": "factorised",
        "benchmark": {"name": "jsonl", "path": str(ws / "bench.jsonl"), "split": "test", "seed": 0,
                      "validation_fraction": 0.25, "batch_size": 8},
        "claims": {"baseline": {"accuracy": 0.9}, "reduced": {"accuracy": 0.95}, "tolerance": 0.01},
    }
    for k, v in over.items():
        if v is None:
            r.pop(k)
        else:
            r[k] = v
    path.write_text(yaml.safe_dump(r))
    return path


def test_wrong_claim_fails_verify_and_refuses_export(workspace, tmp_path, capsys):
    recipe = _recipe(workspace, tmp_path / "r.yaml")
    report = tmp_path / "report.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress"]) == 1
    rep = json.loads(report.read_text())
    assert rep["passed"] is False and [c["passed"] for c in rep["claims"]] == [False, False]
    assert rep["benchmark"]["sizes"] == {"validation": 10, "test": 30} and rep["benchmark"]["n_scored"] == 30
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--report", str(tmp_path / "r2.json"), "--no-progress"]) == 1
    assert not out.exists()
    assert "nothing exported" in capsys.readouterr().err


def test_true_claims_verify_then_export_loads_with_same_logits(workspace, tmp_path):
    probe = _recipe(workspace, tmp_path / "probe.yaml")
    main(["verify", str(probe), "--report", str(tmp_path / "probe.json"), "--no-progress"])
    measured = {c["name"].split(".")[0]: c["measured"] for c in json.loads((tmp_path / "probe.json").read_text())["claims"]}
    recipe = _recipe(workspace, tmp_path / "r.yaml", claims={
        "baseline": {"accuracy": measured["baseline"]}, "reduced": {"accuracy": measured["reduced"]}, "tolerance": 0.0})
    assert main(["verify", str(recipe), "--report", str(tmp_path / "ok.json"), "--no-progress"]) == 0

    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--report", str(tmp_path / "run.json"), "--no-progress"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "recipe.yaml", "README.md", "verify_report.json"} <= files
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["matrices"]
    assert entry["name"] == "model.layers.2.mlp.gate_proj" and entry["rank"] == 3 and entry["storage"] == "factorised"
    assert json.loads((out / "verify_report.json").read_text())["passed"] is True
    # the published recipe names local files by their name only; nothing in the export names a local path
    public = recipe.read_text().replace(str(workspace / "model"), "model").replace(str(workspace / "bench.jsonl"), "bench.jsonl")
    assert (out / "recipe.yaml").read_text() == public
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".md", ".py"):
            assert str(tmp_path) not in f.read_text(), f"{f.name} names a local path"

    # the export reproduces the reduced model: same logits as the recipe's reduction done in memory
    from laser_export.pipeline import load_model, plan, reduce_loaded
    from laser_export.recipe import load_recipe

    p = plan(*load_recipe(recipe))
    in_memory = reduce_loaded(p, load_model(p), progress=False).model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded.get_submodule(entry["name"])).__name__ == "LowRankLinear"
    source = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()
    x = torch.tensor([[5, 17, 9, 44, 3, 71], [8, 8, 120, 2, 64, 33]])
    with torch.no_grad():
        expected, got, before = in_memory(x).logits, reloaded(x).logits, source(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - before).abs().max() > 1e-4  # and the reduction did change the model
    card = (out / "README.md").read_text()
    assert "NOT verified" not in card
    # a JSONL benchmark has no Hub dataset id: the card shows the numbers but publishes no model-index
    assert "model-index" not in ModelCard(card).data.to_dict()
    assert "| Metric | Baseline |" in card


def test_skip_verify_exports_and_says_so_on_the_card(workspace, tmp_path):
    recipe = _recipe(workspace, tmp_path / "r.yaml")
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--skip-verify", "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "NOT verified" in card
    assert "model-index" not in ModelCard(card).data.to_dict()
    assert not (out / "verify_report.json").exists()


def test_limit_is_reported_and_never_satisfies_a_claim(workspace, tmp_path):
    probe = _recipe(workspace, tmp_path / "p.yaml")
    main(["verify", str(probe), "--report", str(tmp_path / "p.json"), "--no-progress", "--limit", "5"])
    rep = json.loads((tmp_path / "p.json").read_text())
    measured = {c["name"].split(".")[0]: c["measured"] for c in rep["claims"]}
    recipe = _recipe(workspace, tmp_path / "r.yaml", claims={
        "baseline": {"accuracy": measured["baseline"]}, "reduced": {"accuracy": measured["reduced"]}, "tolerance": 0.5})
    assert main(["verify", str(recipe), "--limit", "5", "--report", str(tmp_path / "r.json"), "--no-progress"]) == 1
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["benchmark"]["limit"] == 5 and rep["benchmark"]["n_scored"] == 5
    assert all(not c["passed"] and "--limit 5" in c["why"] for c in rep["claims"])


@pytest.mark.parametrize(
    "over, message",
    [
        ({"interventions": [{"layer": 31, "matrix": "fc_in", "rho": 0.1}]}, "interventions[0].layer: model has 3 layers (0..2), got 31"),
        ({"interventions": [{"layer": 1, "matrix": "fc_in", "rho": 1.5}]}, "interventions[0].rho: must be in (0, 1]"),
        ({"interventions": [{"layer": 1, "matrix": "c_fc", "rho": 0.5}]}, "interventions[0].matrix: llama has no matrix 'c_fc'"),
        ({"interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.5, "rank": 2}]}, "interventions[0]: give exactly one of rho"),
        ({"storage": "sparse"}, "storage: Input should be 'dense' or 'factorised'"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"model": {"source": "/no/such/folder"}}, "model.source: local path '/no/such/folder' does not exist"),
        ({"benchmark": {"name": "nope"}}, "unknown benchmark 'nope'"),
    ],
)
def test_bad_input_exits_2_with_one_clear_error_and_writes_nothing(workspace, tmp_path, capsys, over, message):
    recipe = _recipe(workspace, tmp_path / "r.yaml", **over)
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_check_validates_without_weights(workspace, tmp_path, capsys):
    good = _recipe(workspace, tmp_path / "good.yaml")
    bad = _recipe(workspace, tmp_path / "bad.yaml", interventions=[{"layer": 9, "matrix": "mlp", "rho": 0.1}])
    assert main(["check", str(good)]) == 0
    assert main(["check", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "interventions[0].layer: model has 3 layers (0..2), got 9" in err


def test_check_uses_recipe_hints_for_uncached_hub_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    base = {"name": "x", "model": {"source": "EleutherAI/gpt-j-6b", "model_type": "gptj", "num_layers": 28},
            "interventions": [{"layer": 28, "matrix": "fc_in", "rho": 0.01}]}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(base))
    assert main(["check", str(tmp_path / "a.yaml")]) == 2
    assert "model has 28 layers (0..27), got 28" in capsys.readouterr().err
    del base["model"]["num_layers"]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(base))
    assert main(["check", str(tmp_path / "b.yaml")]) == 2
    assert "add model.model_type and model.num_layers" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end CLI run (export + ONNX/push/full forwards): run by .ci/run's slow suite
def test_onnx_export_with_parity_in_the_manifest(workspace, tmp_path):
    recipe = _recipe(workspace, tmp_path / "r.yaml", claims=None, export={"formats": ["safetensors", "onnx"]})
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--no-progress"]) == 0
    onnx = json.loads((out / "manifest.json").read_text())["onnx"]
    assert (out / "onnx" / "model.onnx").is_file() and onnx["passed"] is True  # the layout transformers.js expects
    assert onnx["file"] == "onnx/model.onnx" and not (out / "model.onnx").exists()
    assert 0 <= onnx["max_abs_diff"] <= onnx["tolerance"] == 1e-4


def test_failed_onnx_parity_exports_nothing(workspace, tmp_path, monkeypatch, capsys):
    import laser_export.export.onnx as onnx_mod

    def fail(*a, **k):
        raise onnx_mod.OnnxParityError("max |diff| 3e-2 > tolerance 1e-4", {"max_abs_diff": 3e-2})

    monkeypatch.setattr(onnx_mod, "export_onnx", fail)
    recipe = _recipe(workspace, tmp_path / "r.yaml", claims=None, export={"formats": ["safetensors", "onnx"]})
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--no-progress"]) == 1
    assert "ONNX export failed, nothing exported" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [recipe]


def test_onnx_for_an_unsupported_family_is_a_recipe_error(tmp_path, capsys):
    save_tiny("opt", tmp_path / "opt")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "name": "o", "model": {"source": str(tmp_path / "opt")},
        "interventions": [{"layer": 0, "matrix": "fc_in", "rho": 0.5}], "export": {"formats": ["safetensors", "onnx"]}}))
    assert main([str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "export.formats: ONNX export supports" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end CLI run (export + ONNX/push/full forwards): run by .ci/run's slow suite
def test_run_with_push_then_load_factorised_model_from_the_hub(workspace, tmp_path, capsys, hub_online):
    import os
    import subprocess
    import sys

    from hub_server import HubServer

    recipe = _recipe(workspace, tmp_path / "r.yaml", claims=None)
    out = tmp_path / "out"
    with HubServer(tmp_path / "hub") as hub:
        hub.fail_commits = True
        args = [str(recipe), "--out", str(out), "--push", "--repo-id", "org/tiny-laser", "--endpoint", hub.endpoint, "--no-progress"]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "push failed" in err and f"laser-export push {out}" in err
        assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # local export intact

        hub.fail_commits = False
        assert main(["push", str(out), "--repo-id", "org/tiny-laser", "--endpoint", hub.endpoint]) == 0
        assert "pushed" in capsys.readouterr().err
        assert {"model.safetensors", "manifest.json", "README.md", "recipe.yaml"} <= set(hub.repos["org/tiny-laser"].head.files)

        script = (
            "import torch, laser_export\n"
            "from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained('org/tiny-laser').eval()\n"
            "print(type(m.model.layers[2].mlp.gate_proj).__name__)\n"
            f"torch.save(m(torch.tensor([[5, 6, 7, 8]])).logits.detach(), {str(tmp_path / 'hub.pt')!r})\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == "LowRankLinear"
    local = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = local(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.equal(torch.load(tmp_path / "hub.pt"), expected)


def test_verify_replays_from_the_reduced_layer_and_matches_full_forwards(workspace, tmp_path, monkeypatch):
    from laser_export.prefix import PrefixCache

    calls = []
    real = PrefixCache.run_from
    monkeypatch.setattr(PrefixCache, "run_from", lambda self, batch, layer: calls.append(layer) or real(self, batch, layer))
    recipe = _recipe(workspace, tmp_path / "r.yaml")
    assert main(["verify", str(recipe), "--report", str(tmp_path / "cached.json"), "--no-progress"]) == 1
    assert calls and set(calls) == {2}  # the reduced pass replayed blocks 2.. only
    n_calls = len(calls)
    assert main(["verify", str(recipe), "--report", str(tmp_path / "full.json"), "--no-progress", "--no-prefix-cache"]) == 1
    assert len(calls) == n_calls  # no replay with --no-prefix-cache
    cached, full = (json.loads((tmp_path / f).read_text()) for f in ("cached.json", "full.json"))
    assert cached["prefix_cache"] is True and full["prefix_cache"] is False
    for side in ("baseline", "reduced"):
        for k, v in full["metrics"][side].items():
            assert cached["metrics"][side][k] == pytest.approx(v, abs=1e-5), (side, k)


def test_no_third_party_progress_lines_when_the_output_is_not_a_terminal(workspace, tmp_path, capsys, monkeypatch):
    """Into a log file or a pipe, transformers' tqdm bars would print a line per refresh ("Writing model shards"
    twice, GGUF de-quantization ~40 lines): the CLI silences them when stderr is not a terminal."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    recipe = _recipe(workspace, tmp_path / "r.yaml")
    assert main([str(recipe), "--out", str(tmp_path / "out"), "--skip-verify"]) == 0
    out = capsys.readouterr()
    assert "Writing model shards" not in out.err + out.out and "it/s]" not in out.err + out.out
