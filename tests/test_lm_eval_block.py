"""The recipe's ``lm_eval:`` block: lm-eval tasks measured by verify before and after the reduction, with
paired-bootstrap CIs over the same documents, in the report and on the card. Offline: a multiple-choice task
over a local JSONL (a task YAML in a tmp folder, ``include_path``) on a tiny Llama."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from laser_export.recipe import RecipeError, parse_recipe
from tinymodels import save_tiny, tiny_tokenizer

WORDS = [f"w{i}" for i in range(4, 100)]
DOCS = [{"q": f"w{i} w{i + 1} w{i + 2}", "choices": [f"w{i + 3}", f"w{i + 10}", f"w{i + 20}"], "label": i % 3}
        for i in range(4, 30)]
TASK_YAML = """task: laser_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
BASE = {"name": "lme", "model": {"source": "x/y"}, "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}]}


def _problems(data) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    return e.value.problems


def test_the_block_is_validated_field_by_field():
    ok = parse_recipe({**BASE, "lm_eval": {"tasks": ["arc_easy"], "num_fewshot": 0, "limit": 100}})
    assert ok.lm_eval.tasks == ["arc_easy"] and ok.lm_eval.batch_size == 1 and ok.lm_eval.include_path is None
    assert _problems({**BASE, "lm_eval": {"tasks": []}})[0].startswith("lm_eval.tasks: ")
    assert _problems({**BASE, "lm_eval": {"tasks": ["a", "a"]}}) == ["lm_eval.tasks: task names must be distinct, got ['a', 'a']"]
    assert _problems({**BASE, "lm_eval": {"tasks": ["a"], "limit": 0}})[0].startswith("lm_eval.limit: ")
    assert _problems({**BASE, "lm_eval": {"tasks": ["a"], "num_fewshot": True}})[0].startswith("lm_eval.num_fewshot: ")
    assert _problems({**BASE, "lm_eval": {"tasks": ["a"], "shots": 5}}) == ["lm_eval.shots: unknown field"]


def test_missing_lm_eval_is_an_input_error_naming_the_extra(monkeypatch):
    from laser_export import lm_eval_block
    from laser_export.errors import InputError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.setattr(lm_eval_block, "_MANAGERS", {})
    spec = parse_recipe({**BASE, "lm_eval": {"tasks": ["arc_easy"]}}).lm_eval
    with pytest.raises(RecipeError) as e:
        lm_eval_block.prepare(spec)
    assert isinstance(e.value, InputError)
    assert "lm_eval: needs lm-eval" in str(e.value) and "laser-export[lm-eval]" in str(e.value)


def test_check_refuses_the_block_without_lm_eval_and_for_a_masked_lm(tmp_path, capsys, monkeypatch):
    from laser_export.cli import main

    save_tiny("llama", tmp_path / "llama")
    save_tiny("roberta", tmp_path / "roberta")

    def recipe(model):
        path = tmp_path / f"{model}.yaml"
        path.write_text(yaml.safe_dump({**BASE, "model": {"source": str(tmp_path / model)},
                                        "lm_eval": {"tasks": ["arc_easy"]}}))
        return str(path)

    assert main(["check", recipe("roberta")]) == 2
    assert "lm_eval: lm-eval's HFLM scores causal LMs; roberta is masked-lm" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["check", recipe("llama")]) == 2
    assert "lm_eval: needs lm-eval, which is not installed: pip install 'laser-export[lm-eval]'" in \
        capsys.readouterr().err


lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'laser-export[lm-eval]')")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("lme")
    save_tiny("llama", root / "llama")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "laser_local_mc.yaml").write_text(TASK_YAML.format(data=tasks / "data.jsonl"))
    with open(root / "bench.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"{WORDS[i]} {WORDS[i + 1]}", "answer": WORDS[(i * 11) % 90]}) + "\n")
    return root


def _recipe(ws, path, **lm):
    path.write_text(yaml.safe_dump({
        "name": "lme",
        "model": {"source": str(ws / "llama")},
        "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.05}],
        "benchmark": {"name": "jsonl", "path": str(ws / "bench.jsonl"), "validation_fraction": 0.25},
        "lm_eval": {"tasks": ["laser_local_mc"], "include_path": str(ws / "tasks"), "batch_size": 4, **lm},
    }))
    return path


def test_unknown_task_is_exit_2_naming_the_field_before_weights_load(ws, tmp_path, capsys, monkeypatch):
    from laser_export import runner
    from laser_export.cli import main

    def no_load(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(runner, "load_model", no_load)
    rc = main(["verify", str(_recipe(ws, tmp_path / "r.yaml", tasks=["laser_local_mc", "no_such_task_xyz"])),
               "--report", str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "lm_eval.tasks[1]: unknown lm-eval task 'no_such_task_xyz'" in err
    assert not (tmp_path / "r.json").exists()
    # --dry-run checks the names too (it loads no task data: that may download)
    assert main(["verify", str(_recipe(ws, tmp_path / "r.yaml", tasks=["no_such_task_xyz"])), "--dry-run",
                 "--report", str(tmp_path / "r.json"), "--no-progress"]) == 2
    assert "lm_eval.tasks[0]: unknown lm-eval task 'no_such_task_xyz'" in capsys.readouterr().err
    assert main(["verify", str(_recipe(ws, tmp_path / "r.yaml")), "--dry-run", "--report", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0


def test_verify_measures_lm_eval_before_and_after_with_paired_cis_and_the_card_shows_it(ws, tmp_path):
    from laser_export.cli import main
    from laser_export.export.card import render_card
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    report_path = tmp_path / "r.json"
    rc = main(["verify", str(_recipe(ws, tmp_path / "r.yaml", limit=20, num_fewshot=0)),
               "--report", str(report_path), "--no-progress"])
    assert rc == 0
    rep = json.loads(report_path.read_text())  # valid JSON (no NaN)
    section = rep["lm_eval"]
    assert section["library"] == "lm-eval" and section["version"] == lm_eval.__version__
    assert section["limit"] == 20 and section["num_fewshot"] == 0
    task = section["tasks"]["laser_local_mc"]
    assert task["n"] == 20 and task["n_available"] == len(DOCS)
    assert task["dataset"] == {"path": "json", "name": None, "split": "test", "hub": False}
    acc = task["metrics"]["acc,none"]
    assert set(task["metrics"]) == {"acc,none", "acc_norm,none"}
    d = acc["delta"]
    assert d["n"] == 20 and d["estimate"] == pytest.approx(acc["reduced"] - acc["baseline"])
    assert d["ci95"][0] <= d["estimate"] <= d["ci95"][1]
    # the baseline numbers are the unreduced model's, as lm-eval measures it by path
    model = AutoModelForCausalLM.from_pretrained(ws / "llama")
    tm = lm_eval.tasks.TaskManager(include_path=str(ws / "tasks"), include_defaults=False)
    ref = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=4),
                          tasks=["laser_local_mc"], task_manager=tm, limit=20, num_fewshot=0, bootstrap_iters=0)
    assert acc["baseline"] == pytest.approx(ref["results"]["laser_local_mc"]["acc,none"])
    # the reduced model is really another model here (ρ = 0.05 of a tiny MLP changes the scores)
    assert acc["reduced"] != acc["baseline"] or task["metrics"]["acc_norm,none"]["reduced"] != \
        task["metrics"]["acc_norm,none"]["baseline"] or d["ci95"] != [0.0, 0.0]

    # the export built from this report carries it: verify_report.json and the card's lm-eval table
    out = tmp_path / "out"
    assert main(["apply", str(tmp_path / "r.yaml"), "--report", str(report_path), "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "verify_report.json").read_text())["lm_eval"] == section
    readme = (out / "README.md").read_text()
    assert "## lm-eval tasks" in readme and str(ws) not in readme  # no local path (include_path) on the card

    manifest = {"model": {"source": "x/y", "model_type": "llama"}, "storage": "dense", "matrices": []}
    recipe = {**BASE, "lm_eval": {"tasks": ["laser_local_mc"], "limit": 20}}
    card = str(render_card(recipe, "name: lme\n", manifest, {**rep, "passed": True}))
    assert "## lm-eval tasks" in card
    assert f"lm-eval {lm_eval.__version__}" in card and "first 20 documents" in card
    assert f"| laser_local_mc | acc | 20 | {acc['baseline']:.4f} | {acc['reduced']:.4f} |" in card
    # a local JSONL has no Hub dataset id: no model-index entry for it
    assert "laser_local_mc" not in card.split("---")[1]


SECTION = {"library": "lm-eval", "version": "0.4.13", "url": "https://github.com/EleutherAI/lm-evaluation-harness",
           "num_fewshot": 0, "limit": 100, "batch_size": 1, "tasks": {
               "arc_easy": {"dataset": {"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "test", "hub": True},
                            "version": 1.0, "num_fewshot": 0, "n": 100, "n_available": 2376, "metrics": {
                                "acc,none": {"filter": "none", "baseline": 0.5, "reduced": 0.47,
                                             "higher_is_better": True,
                                             "delta": {"estimate": -0.03, "ci95": [-0.07, 0.01], "n": 100}},
                                "f1,none": {"filter": "none", "baseline": 0.4, "reduced": 0.41, "delta": None,
                                            "why": "lm-eval's aggregate is not the mean of the per-document scores: no paired CI"}}},
               "local_mc": {"dataset": {"path": "json", "name": None, "split": "test", "hub": False}, "n": 10,
                            "metrics": {"acc,none": {"baseline": 0.1, "reduced": 0.2, "delta": None}}}}}


def test_card_table_and_model_index_name_lm_eval_its_version_and_the_limit():
    from laser_export.export.card import render_card

    manifest = {"model": {"source": "x/y", "model_type": "llama"}, "storage": "dense", "matrices": []}
    report = {"recipe": "lme", "metrics": {}, "passed": True, "lm_eval": SECTION}
    card = str(render_card(BASE, "name: lme\n", manifest, report))
    front, body = card.split("---")[1], card.split("---", 2)[2]
    assert "| arc_easy | acc | 100 | 0.5000 | 0.4700 | -0.0300 | [-0.0700, +0.0100] |" in body
    assert "| arc_easy | f1 | 100 | 0.4000 | 0.4100 | — | lm-eval's aggregate is not the mean" in body
    assert "lm-eval 0.4.13" in body and "first 100 documents" in body
    meta = yaml.safe_load(front)
    results = meta["model-index"][0]["results"]
    lm = [r for r in results if r["task"]["name"] == "lm-eval arc_easy"]
    assert len(lm) == 1  # the local JSON task has no Hub dataset id: no entry for it
    assert not [r for r in results if "local_mc" in r["task"]["name"]]
    (entry,) = lm
    assert {m["type"]: m["value"] for m in entry["metrics"]} == {"acc": 0.47, "f1": 0.41}  # the reduced model's
    assert entry["dataset"]["type"] == "allenai/ai2_arc" and entry["dataset"]["config"] == "ARC-Easy"
    assert entry["dataset"]["split"] == "test" and entry["dataset"]["args"]["limit"] == 100
    assert entry["source"] == {"name": "lm-eval 0.4.13 (lm-evaluation-harness), run by laser-export verify",
                               "url": "https://github.com/EleutherAI/lm-evaluation-harness"}
    # not verified (--skip-verify): no model-index results at all
    skipped = str(render_card(BASE, "name: lme\n", manifest, {**report, "skip_verify": True}))
    assert "model-index" not in skipped.split("---")[1]


def test_two_passes_over_the_same_model_pair_exactly_even_with_few_shot(ws):
    """The tasks are loaded once; both passes see the same documents and the same few-shot prompts (lm-eval's
    seeds), so an unchanged model gives Δ = 0 with a [0, 0] interval on every metric."""
    from laser_export.lm_eval_block import prepare
    from transformers import AutoModelForCausalLM

    spec = parse_recipe({**BASE, "lm_eval": {"tasks": ["laser_local_mc"], "include_path": str(ws / "tasks"),
                                             "num_fewshot": 2, "limit": 8, "batch_size": 4}}).lm_eval
    passes = prepare(spec)
    model, tok = AutoModelForCausalLM.from_pretrained(ws / "llama"), tiny_tokenizer()
    tok.pad_token = None  # HFLM sets one on the tokenizer it gets
    passes.baseline(model, tok)
    section = passes.reduced(model, tok)
    assert tok.pad_token is None  # lm-eval configured a copy of the tokenizer, not the one that is exported
    task = section["tasks"]["laser_local_mc"]
    assert task["n"] == 8 and task["num_fewshot"] == 2
    for m in task["metrics"].values():
        assert m["baseline"] == m["reduced"] and m["delta"] == {"estimate": 0.0, "ci95": [0.0, 0.0], "n": 8}


def test_language_is_validated_and_carried_to_the_card_front_matter():
    from laser_export.export.card import render_card

    assert parse_recipe({**BASE, "model": {"source": "x/y", "language": "en"}}).model.language == "en"
    assert parse_recipe({**BASE, "model": {"source": "x/y", "language": ["en", "fra", "yue"]}}).model.language == \
        ["en", "fra", "yue"]
    for bad in ("english", "EN", "zz", "qqq", ["en", "en"], [], 3, ["en", 1]):
        (problem,) = _problems({**BASE, "model": {"source": "x/y", "language": bad}})
        assert problem.startswith("model.language: "), problem
    manifest = {"model": {"source": "x/y", "model_type": "llama"}, "storage": "dense", "matrices": []}
    for lang, want in (("en", "en"), (["en", "fr"], ["en", "fr"]), (None, None)):
        recipe = {**BASE, "model": {"source": "x/y", **({"language": lang} if lang else {})}}
        meta = yaml.safe_load(str(render_card(recipe, "name: lme\n", manifest, None)).split("---")[1])
        assert meta.get("language") == want


def test_card_limits_do_not_say_other_tasks_were_unmeasured_when_lm_eval_measured_some():
    from laser_export.export.card import render_card

    manifest = {"model": {"source": "x/y", "model_type": "llama"}, "storage": "dense", "matrices": []}
    recipe = {**BASE, "benchmark": {"name": "jsonl", "path": "b.jsonl"}}
    bench = {"name": "jsonl", "split": "test", "seed": 0, "validation_fraction": 0.2, "sizes": {"test": 9},
             "n_scored": 9, "examples_sha256": "ab", "limit": None}
    report = {"recipe": "lme", "benchmark": bench, "metrics": {"baseline": {"top1": 0.1}, "reduced": {"top1": 0.2}},
              "passed": True}
    plain = str(render_card(recipe, "name: lme\n", manifest, report))
    assert "General language-modelling quality (perplexity) and other tasks were not measured" in plain
    with_lm = str(render_card(recipe, "name: lme\n", manifest, {**report, "lm_eval": SECTION}))
    assert "tasks other than the lm-eval ones above were not measured" in with_lm
