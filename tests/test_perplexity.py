"""Perplexity on general text (the collateral cost of an intervention): sliding-window numbers,
text sources, and verify/card/check integration."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from laser_export.perplexity import PerplexityOptions, load_text, perplexity, token_ids
from tinymodels import save_tiny, tiny_model, tiny_tokenizer

HUB = Path(__file__).parent / "fixtures" / "hub"
WORDS = [f"w{i}" for i in range(4, 100)]


def _ids(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 120, (n,), generator=g).tolist()


def test_one_window_equals_the_models_own_loss():
    model, ids = tiny_model("llama"), _ids(40)
    r = perplexity(model, ids, context=64, stride=64, progress=False)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert r["n_tokens"] == 39
    assert r["nll_per_token"] == pytest.approx(float(loss), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_sliding_windows_predict_every_token_once_with_the_stated_context():
    model, ids = tiny_model("gpt2"), _ids(50)  # absolute positions: context matters
    r = perplexity(model, ids, context=16, stride=8, progress=False)
    assert r["n_tokens"] == 49
    # by hand: window [b, b+16), tokens from max(prev_end, b+1) scored
    nll, prev = 0.0, 0
    with torch.no_grad():
        for b in range(0, 50, 8):
            e = min(b + 16, 50)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[b:e]])).logits[0], -1)
            for t in range(max(prev, b + 1), e):
                nll -= float(logp[t - b - 1, ids[t]])
            prev = e
            if e == 50:
                break
    assert r["nll_per_token"] == pytest.approx(nll / 49, rel=1e-5)
    assert r["perplexity"] != pytest.approx(perplexity(model, ids, context=50, stride=50, progress=False)["perplexity"])
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, context=8, stride=16, progress=False)


def test_text_from_txt_files_and_hub_layout(tmp_path):
    (tmp_path / "b.txt").write_text("w5 w6")
    (tmp_path / "a.txt").write_text("w4")
    assert load_text(PerplexityOptions(path=tmp_path)) == "w4\n\nw5 w6"
    assert load_text(PerplexityOptions(path=tmp_path / "a.txt")) == "w4"
    text = load_text(PerplexityOptions(path=HUB / "Salesforce/wikitext"))
    assert text.startswith("\n\n = Valkyria Chronicles III = \n") and "w20 w21" in text
    ids = token_ids(tiny_tokenizer(), text, max_tokens=10)
    assert len(ids) == 10


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    save_tiny("llama", root / "llama")
    save_tiny("roberta", root / "roberta")
    (root / "text").mkdir()
    (root / "text" / "t.txt").write_text(" ".join(WORDS[(i * 7) % 90] for i in range(300)))
    with open(root / "bench.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"{WORDS[i]} {WORDS[i + 1]}", "answer": WORDS[(i * 11) % 90]}) + "\n")
    return root


def _recipe(ws, path, model="llama"):
    path.write_text(yaml.safe_dump({
        "name": "ppl",
        "model": {"source": str(ws / model)},
        "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
        "benchmark": {"name": "jsonl", "path": str(ws / "bench.jsonl"), "validation_fraction": 0.25},
        "claims": {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5}, "tolerance": 0.01},
        "perplexity": {"path": str(ws / "text"), "max_tokens": 200, "context": 32, "stride": 16},
    }))
    return path


def test_verify_reports_perplexity_next_to_the_claims_and_the_card_shows_it(ws, tmp_path):
    from laser_export.cli import main
    from laser_export.export.card import render_card

    report_path = tmp_path / "r.json"
    assert main(["verify", str(_recipe(ws, tmp_path / "p.yaml")), "--report", str(report_path), "--no-progress"]) in (0, 1)
    rep = json.loads(report_path.read_text())
    ppl = rep["perplexity"]
    assert ppl["n_tokens"] == 199 and ppl["context"] == 32 and ppl["stride"] == 16
    assert ppl["baseline"] > 1 and ppl["reduced"] > 1 and ppl["baseline"] != ppl["reduced"]
    assert ppl["ratio"] == pytest.approx(ppl["reduced"] / ppl["baseline"])
    # the baseline number is the unreduced model's
    ids = token_ids(tiny_tokenizer(), (ws / "text" / "t.txt").read_text(), 200)
    assert ppl["baseline"] == pytest.approx(perplexity(tiny_model("llama"), ids, context=32, stride=16, progress=False)["perplexity"], rel=1e-5)
    manifest = {"model": {"source": "x/y", "model_type": "llama"}, "storage": "dense", "matrices": []}
    recipe = {"name": "ppl", "model": {"source": "x/y"}, "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}]}
    card = str(render_card(recipe, "name: ppl\n", manifest, {**rep, "passed": True}))
    assert "## Measured costs" in card
    assert f"- Perplexity: {ppl['baseline']:.3f} → {ppl['reduced']:.3f}" in card


def test_check_refuses_perplexity_for_a_masked_lm(ws, tmp_path, capsys):
    from laser_export.cli import main

    assert main(["check", str(_recipe(ws, tmp_path / "r.yaml", model="roberta"))]) == 2
    assert "perplexity: measured for causal LMs; roberta" in capsys.readouterr().err
