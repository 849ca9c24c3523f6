"""Masked-LM scoring (RoBERTa/BERT) in the paper's protocol, check's family/benchmark/scorer rules,
and RoBERTa end to end through the CLI on a tiny model."""

import json

import pytest
import torch
import yaml

from laser_export.benchmarks import Example
from laser_export.evaluate import score_examples, score_masked
from laser_export.selection import score
from tinymodels import V, save_tiny, tiny_mlm_tokenizer, tiny_model

WORDS = [f"w{i}" for i in range(4, 100)]


def _examples():
    out = []
    for i in range(6):  # generative, different lengths; one with the paper's trailing "." after the mask
        words = " ".join(WORDS[(i * 7 + j) % 90] for j in range(2 + i % 4))
        masked = f"{words} {{mask}} ." if i % 3 == 0 else None
        out.append(Example(id=f"g{i}", prompt=words, answers=(WORDS[(i * 11) % 90], WORDS[i]), masked_prompt=masked))
    for i in range(4):  # choice
        words = " ".join(WORDS[(i * 5 + j) % 90] for j in range(3 + i % 3))
        out.append(Example(id=f"c{i}", prompt=words, answers=("w40",), choices=("w40", "w41", "w42"), label=i % 3))
    return out


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_batched_masked_scores_equal_batch_size_one(model_type):
    model, tok = tiny_model(model_type), tiny_mlm_tokenizer()
    ex = _examples()
    one = score_masked(model, tok, ex, batch_size=1, progress=False)
    many = score_masked(model, tok, ex, batch_size=5, progress=False)
    for a, b in zip(one.per_example, many.per_example):
        assert a["id"] == b["id"]
        for k in ("top1", "top5", "top10", "top1_no_article", "accuracy", "prediction"):
            assert a.get(k) == b.get(k), (a["id"], k)
        assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-5)
    assert one.metrics.keys() == many.metrics.keys()
    for k, v in one.metrics.items():
        assert many.metrics[k] == pytest.approx(v, abs=1e-6)
    # the scores really depend on the input (no constant output): predictions differ across examples
    assert len({r["predicted_token"] for r in one.per_example if "predicted_token" in r}) > 1


def _vocab_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def test_hand_built_mask_top_k_and_choices():
    words = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "the", "Paris", "Lyon", "Rome", "capital", "is", "true", "false"]
    tok = _vocab_tokenizer(words)
    idx = {w: i for i, w in enumerate(words)}
    # scores at the mask: the > Lyon > Paris > Rome > ... ; elsewhere uniform
    at_mask = torch.full((len(words),), -10.0)
    for rank, w in enumerate(["the", "Lyon", "Paris", "Rome", "true", "false"]):
        at_mask[idx[w]] = 10.0 - rank
    seen = []

    def forward(model, input_ids, attention_mask):
        seen.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, len(words))
        logits[input_ids == idx["<mask>"]] = at_mask
        return logits

    ex = [
        Example(id="a", prompt="capital is", answers=("Paris",)),
        Example(id="b", prompt="capital is", answers=("the Lyon",), masked_prompt="capital {mask} is"),
        Example(id="c", prompt="capital is", answers=("Rome",)),
        Example(id="d", prompt="capital is", answers=("false",), choices=("true", "false"), label=1),
        Example(id="e", prompt="Paris", answers=("true",), choices=("true", "false"), label=0),
    ]
    r = score_masked(torch.nn.Identity(), tok, ex, batch_size=2, progress=False, forward_fn=forward)
    rows = {row["id"]: row for row in r.per_example}
    # a: Paris is 3rd: top1 no, top5 yes; without articles Lyon is first -> no
    assert (rows["a"]["top1"], rows["a"]["top5"], rows["a"]["top1_no_article"]) == (False, True, False)
    # b: the answer "the Lyon" starts with "the" (the argmax) -> top1; article-excluded argmax is Lyon = stripped answer
    assert (rows["b"]["top1"], rows["b"]["top1_no_article"]) == (True, True)
    assert (rows["c"]["top1"], rows["c"]["top5"]) == (False, True)
    logz = torch.logsumexp(at_mask, 0)
    assert rows["a"]["logprob"] == pytest.approx(float(at_mask[idx["Paris"]] - logz), abs=1e-5)
    # choices compared at the mask: true (6) beats false (5)
    assert rows["d"]["prediction"] == 0 and rows["d"]["accuracy"] is False
    assert rows["e"]["prediction"] == 0 and rows["e"]["accuracy"] is True
    assert r.metrics["accuracy"] == 0.5 and r.metrics["top1"] == pytest.approx(2 / 5)
    # the prompt is followed by the mask token, inside <s> ... </s>; the template puts it where it says
    rows_ids = [row[row != idx["<pad>"]].tolist() for batch in seen for row in batch]
    assert [1, idx["capital"], idx["is"], idx["<mask>"], 2] in rows_ids
    assert [1, idx["capital"], idx["<mask>"], idx["is"], 2] in rows_ids


def test_masked_prompt_needs_exactly_one_mask_and_distinct_choice_tokens():
    tok, model = tiny_mlm_tokenizer(), tiny_model("roberta")
    with pytest.raises(ValueError, match="2 mask tokens"):
        score_masked(model, tok, [Example("x", "w4", ("w5",), masked_prompt="{mask} w4 {mask}")], progress=False)
    with pytest.raises(ValueError, match="share a first token"):
        score_masked(model, tok, [Example("x", "w4", ("w5 w6",), choices=("w5 w6", "w5 w7"), label=0)], progress=False)


def test_score_dispatches_by_scorer_name():
    tok, model = tiny_mlm_tokenizer(), tiny_model("roberta")
    ex = _examples()[:3]
    assert score("masked", model, tok, ex, progress=False).per_example == score_masked(model, tok, ex, progress=False).per_example
    with pytest.raises(ValueError, match="unknown scorer"):
        score("nope", model, tok, ex)


# ---------------------------------------------------------------- check and the CLI


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    save_tiny("roberta", root / "roberta")
    with open(root / "bench.jsonl", "w") as f:
        for i in range(40):
            a, b, c = WORDS[i % 90], WORDS[(3 * i + 1) % 90], WORDS[(7 * i + 2) % 90]
            f.write(json.dumps({"prompt": f"{a} {b} {c}", "answer": WORDS[(i * 11) % 90]}) + "\n")
    return root


def _recipe(ws, path, bench, **claims):
    r = {
        "name": "tiny-roberta",
        "model": {"source": str(ws / "roberta"), "license": "mit"},
        "interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1}],
        "storage": "factorised",
        "benchmark": bench,
    }
    if claims:
        r["claims"] = {"baseline": {"accuracy": claims["baseline"]}, "reduced": {"accuracy": claims["reduced"]},
                       "tolerance": 1e-6}
    path.write_text(yaml.safe_dump(r))
    return path


def test_check_rejects_a_benchmark_without_a_scorer_for_the_family(ws, tmp_path, capsys, monkeypatch):
    from laser_export.benchmarks import BENCHMARKS, BenchmarkSpec
    from laser_export.cli import main

    monkeypatch.setitem(BENCHMARKS, "gen_only", BenchmarkSpec("gen_only", "generation only", lambda p: [],
                                                                 scorers=("generate",), metrics=("exact_match",)))
    recipe = _recipe(ws, tmp_path / "r.yaml", {"name": "gen_only", "metric": "exact_match"})
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "benchmark.name: gen_only is scored by the generate scorer; roberta" in err
    recipe = _recipe(ws, tmp_path / "r2.yaml", {"name": "jsonl", "path": str(ws / "bench.jsonl"), "metric": "f1"})
    assert main(["check", str(recipe)]) == 2
    assert "benchmark.metric: jsonl has no metric 'f1'" in capsys.readouterr().err
    recipe = _recipe(ws, tmp_path / "r3.yaml", {"name": "jsonl", "path": str(ws / "bench.jsonl")})
    assert main(["check", str(recipe)]) == 0


def test_roberta_verifies_and_exports_end_to_end(ws, tmp_path):
    """verify measures with the masked scorer; the claims it measured verify; the export loads as a
    masked LM with the same logits and its card says fill-mask."""
    from transformers import AutoModelForMaskedLM

    from laser_export.cli import main

    bench = {"name": "jsonl", "path": str(ws / "bench.jsonl"), "seed": 0, "validation_fraction": 0.25, "batch_size": 8}
    first = _recipe(ws, tmp_path / "measure.yaml", bench, baseline=0.5, reduced=0.5)
    report = tmp_path / "m.json"
    assert main(["verify", str(first), "--report", str(report), "--no-progress"]) == 1  # claims are guesses
    rep = json.loads(report.read_text())
    assert rep["scorer"] == "masked" and rep["benchmark"]["n_scored"] == 30
    base, red = rep["metrics"]["baseline"]["top1"], rep["metrics"]["reduced"]["top1"]
    assert set(rep["delta"]) >= {"top1", "top5", "top10", "top1_no_article", "logprob", "logloss"}
    assert rep["metrics"]["baseline"]["logprob"] != rep["metrics"]["reduced"]["logprob"]  # the reduction acts

    recipe = _recipe(ws, tmp_path / "r.yaml", bench, baseline=base, reduced=red)
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--report", str(tmp_path / "r.json"), "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "AutoModelForMaskedLM.from_pretrained" in card
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    reference = tiny_model("roberta")
    x = torch.randint(4, V - 1, (2, 6))
    with torch.no_grad():
        assert not torch.allclose(loaded(x).logits, reference(x).logits)  # reduced, not the original
    from laser_export.architectures import family_for
    from laser_export.intervene import plan_targets, reduce_model
    from laser_export.recipe import Intervention

    fam = family_for("roberta")
    reduce_model(reference, fam, plan_targets([Intervention(layer=2, matrix="fc_in", rho=0.1)], reference.config, fam),
                 storage="factorised")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=0, atol=1e-5)


def test_roberta_on_hotpot_uses_masked_generation(ws, tmp_path, capsys):
    from laser_export.benchmarks import BENCHMARKS
    from laser_export.cli import main
    from laser_export.selection import scorer_for
    from laser_export.architectures import family_for

    assert scorer_for(family_for("roberta"), BENCHMARKS["hotpot_qa"]) == "masked_generate"
    assert scorer_for(family_for("llama"), BENCHMARKS["hotpot_qa"]) == "generate"
    recipe = _recipe(ws, tmp_path / "h.yaml", {"name": "hotpot_qa", "metric": "contains"})
    assert main(["check", str(recipe)]) == 0


def test_masked_generation_batched_equals_one_and_reads_the_masks():
    from laser_export.evaluate import score_masked_generate

    model, tok = tiny_model("roberta"), tiny_mlm_tokenizer()
    ex = [Example(id=str(i), prompt=" ".join(WORDS[(i * 3 + j) % 90] for j in range(1 + i % 4)), answers=(WORDS[i],))
          for i in range(8)]
    one = score_masked_generate(model, tok, ex, batch_size=1, progress=False, n_masks=3)
    many = score_masked_generate(model, tok, ex, batch_size=3, progress=False, n_masks=3)
    assert [r["generation"] for r in one.per_example] == [r["generation"] for r in many.per_example]
    assert all(len(r["generation"].split()) == 3 for r in one.per_example)
    ex2 = [Example(id=e.id, prompt=e.prompt, answers=(r["generation"].split()[1],)) for e, r in zip(ex, one.per_example)]
    r = score_masked_generate(model, tok, ex2, batch_size=4, progress=False, n_masks=3)
    assert r.metrics["contains"] == 1.0 and r.metrics["exact_match"] == 0.0


def test_the_metric_picks_the_scorer():
    from laser_export.architectures import family_for
    from laser_export.benchmarks import BENCHMARKS
    from laser_export.selection import scorer_for

    cf, wiki, hot = BENCHMARKS["counterfact"], BENCHMARKS["qa_wikidata"], BENCHMARKS["hotpot_qa"]
    llama, roberta = family_for("llama"), family_for("roberta")
    assert scorer_for(llama, cf, "top1") == "causal" and scorer_for(llama, cf, "contains") == "generate"
    assert scorer_for(roberta, wiki, "top1") == "masked" and scorer_for(roberta, wiki, "contains") == "masked_generate"
    with pytest.raises(ValueError, match="benchmark.metric: top1 needs a single-position scorer; llama scores hotpot_qa with generate"):
        scorer_for(llama, hot, "top1")


def test_long_masked_prompts_keep_their_end():
    tok, model = tiny_mlm_tokenizer(), tiny_model("roberta")
    long = Example("x", " ".join(WORDS[:40]), ("w5",))
    tok.model_max_length = 10
    a = score_masked(model, tok, [long], progress=False).per_example[0]
    tok.model_max_length = 10_000  # what fits in 10: <s>, the last 7 words, <mask>, </s>
    b = score_masked(model, tok, [Example("x", " ".join(WORDS[33:40]), ("w5",))], progress=False).per_example[0]
    assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-6)
