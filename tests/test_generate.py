"""The generate scorer (HotpotQA protocol): batched greedy generation equals batch size 1; only new
tokens are scored; exact match / contains / bag-of-words F1."""

import pytest
import torch

from laser_export.benchmarks import Example
from laser_export.evaluate import score_generate, token_f1
from tinymodels import tiny_model, tiny_tokenizer

WORDS = [f"w{i}" for i in range(4, 100)]


def test_batched_generation_equals_batch_size_one():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ex = [Example(id=str(i), prompt=" ".join(WORDS[(i * 7 + j) % 90] for j in range(2 + i % 5)), answers=(WORDS[i],))
          for i in range(10)]
    one = score_generate(model, tok, ex, batch_size=1, progress=False, max_new_tokens=6)
    many = score_generate(model, tok, ex, batch_size=4, progress=False, max_new_tokens=6)
    assert [r["generation"] for r in one.per_example] == [r["generation"] for r in many.per_example]
    assert one.metrics == many.metrics
    gens = [r["generation"] for r in one.per_example]
    assert all(0 < len(g.split()) <= 6 for g in gens) and len(set(gens)) > 1
    # only new tokens: the prompt is never part of the scored generation
    assert not any(g.startswith(e.prompt) for g, e in zip(gens, ex))
    # an answer equal to the model's own greedy output scores exact match 1
    ex2 = [Example(id=e.id, prompt=e.prompt, answers=(g,)) for e, g in zip(ex, gens)]
    r = score_generate(model, tok, ex2, batch_size=3, progress=False, max_new_tokens=6)
    assert r.metrics["exact_match"] == 1.0 and r.metrics["contains"] == 1.0 and r.metrics["f1"] == pytest.approx(1.0)


def test_token_f1_and_normalisation():
    assert token_f1("The Eiffel Tower, Paris", "paris") == pytest.approx(2 * 0.25 * 1 / 1.25)
    assert token_f1("Paris.", "Paris") == 1.0
    assert token_f1("Rome", "Paris") == 0.0


def test_generate_refuses_choice_examples():
    with pytest.raises(ValueError, match="not choices"):
        score_generate(tiny_model("llama"), tiny_tokenizer(), [Example("c", "w4", ("w5",), ("w5", "w6"), 0)], progress=False)


@pytest.mark.parametrize("model_type,scorer", [("llama", "generate"), ("roberta", "masked_generate")])
def test_verify_hotpot_from_the_hub_fixture(tmp_path, model_type, scorer):
    import json
    from pathlib import Path

    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    save_tiny(model_type, tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "hotpot",
        "model": {"source": str(tmp_path / "m")},
        "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
        "benchmark": {"name": "hotpot_qa", "path": str(Path(__file__).parent / "fixtures/hub/hotpotqa/hotpot_qa"),
                      "seed": None, "validation_fraction": 0.34, "metric": "contains"},
        "claims": {"baseline": {"accuracy": 0.0}, "reduced": {"accuracy": 0.0}, "tolerance": 0.0},
    }))
    assert main(["verify", str(recipe), "--report", str(tmp_path / "rep.json"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["scorer"] == scorer and rep["benchmark"]["n_scored"] == 2
    sources = rep["benchmark"]["sources"]  # provenance: the local Hub-layout files and their SHA-256
    assert [(s["repo"], s["config"], s["split"]) for s in sources] == [
        ("hotpotqa/hotpot_qa", "fullwiki", "validation"), ("hotpotqa/hotpot_qa", "fullwiki", "train")]
    import hashlib

    for s in sources:
        for f, digest in s["files"].items():
            assert hashlib.sha256(Path(f).read_bytes()).hexdigest() == digest
    assert len(sources[1]["files"]) == 2
    assert set(rep["metrics"]["baseline"]) == {"exact_match", "contains", "f1", "n"}
    assert set(rep["delta"]) == {"exact_match", "contains", "f1"}
