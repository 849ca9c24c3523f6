import math

import numpy as np
import pytest
import torch

import laser_export.evaluate as ev
from laser_export.benchmarks import Example
from laser_export.evaluate import ScoreResult, article_token_ids, score_examples, strip_leading_article
from laser_export.stats import paired_bootstrap

CORPUS = [
    "The mother tongue of Danielle Darrieux is French",
    "the capital of France is Paris",
    "a dog runs on the grass",
    "an apple is a fruit",
    "The Beatles are a band from England",
    "Toko Yasuda plays the guitar",
] * 5


def make_tokenizer(with_pad=True, with_bos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = dict(bos_token="<s>", eos_token="</s>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.2,  # peaky, well-separated logits
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt2_model(tokenizer):
    """Absolute position embeddings: wrong position_ids under left padding would change the numbers
    (RoPE models like Llama are invariant to a constant position shift, so they cannot catch it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def tid(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def mixed_examples():
    return [
        Example("g0", "The mother tongue of Danielle Darrieux is", ("French",)),
        Example("g1", "the capital of France is", ("Paris", "the city of Paris")),
        Example("g2", "a dog", ("runs on the grass",)),
        Example("c0", "Is an apple a fruit? Answer:", ("yes",), choices=("yes", "no", "maybe so"), label=0),
        Example("g3", "Toko Yasuda plays", ("the guitar", "guitar")),
        Example("g4", "The Beatles are a band from", ("England",)),
        Example("c1", "The Beatles are", ("a band",), choices=("a band", "a fruit"), label=0),
        Example("g5", "an", ("apple",)),
    ]


# ---------------------------------------------------------------- tiny real model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_batch_size_one(arch, request, tokenizer):
    model = request.getfixturevalue("model" if arch == "llama" else "gpt2_model")
    examples = mixed_examples()
    r1 = score_examples(model, tokenizer, examples, batch_size=1, progress=False)
    r16 = score_examples(model, tokenizer, examples, batch_size=16, progress=True)
    r3 = score_examples(model, tokenizer, examples, batch_size=3, progress=False)
    assert r1.ids == [e.id for e in examples]
    for other in (r16, r3):
        for a, b in zip(r1.per_example, other.per_example):
            assert a.keys() == b.keys()
            for k in a:
                if k in ("logprob", "logloss"):
                    assert abs(a[k] - b[k]) <= 1e-5, (a["id"], k)
                elif k == "choice_logprobs":
                    assert np.allclose(a[k], b[k], atol=1e-5, rtol=0)
                else:
                    assert a[k] == b[k], (a["id"], k)
    assert r1.metrics["n"] == 8
    for k in ("top1", "top5", "top10", "top1_no_article", "accuracy"):
        assert r1.metrics[k] == r16.metrics[k]


def test_progress_is_counted_in_examples_not_rows(model, tokenizer, monkeypatch):
    """Issue 12: the scorer's bar totals the examples (a choice or multi-answer example is several rows)
    and names its unit; it advances when an example's last row is scored, so it ends at exactly n."""
    from laser_export import progress

    seen = []
    real = progress.bar

    def spy(*a, **k):
        bar = real(*a, **k)
        add, adv = bar.add_task, bar.advance
        bar.add_task = lambda *a2, **k2: seen.append(("total", k2["total"])) or add(*a2, **k2)
        bar.advance = lambda task, n=1: seen.append(("advance", n)) or adv(task, n)
        seen.append(("unit", k.get("unit")))
        return bar

    monkeypatch.setattr(progress, "bar", spy)
    examples = mixed_examples()
    n_rows = sum(len(e.choices) if e.is_choice else len(e.answers) for e in examples)
    assert n_rows > len(examples)
    score_examples(model, tokenizer, examples, batch_size=3, progress=False)
    assert ("unit", "examples") in seen and ("total", len(examples)) in seen
    assert sum(n for what, n in seen if what == "advance") == len(examples)


def test_matches_unbatched_reference_computation(model, tokenizer):
    """Logprob / top-k against a direct, unpadded forward pass on BOS + prompt + ' ' + answer."""
    ex = Example("g1", "the capital of France is", ("Paris", "the city of Paris"))
    res = score_examples(model, tokenizer, [ex] + mixed_examples()[2:5], batch_size=4, progress=False)
    row = res.per_example[0]
    prompt = [tokenizer.bos_token_id] + tid(tokenizer, ex.prompt)
    best_lp, best_n = -math.inf, None
    with torch.no_grad():
        for ans in ex.answers:
            cont = tid(tokenizer, " " + ans)
            ids = torch.tensor([prompt + cont])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            lp = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
            if lp > best_lp:
                best_lp, best_n = lp, len(cont)
            nxt = logp[len(prompt) - 1]
    assert row["logprob"] == pytest.approx(best_lp, abs=1e-5)
    assert row["n_answer_tokens"] == best_n
    assert row["logloss"] == pytest.approx(-best_lp / best_n, abs=1e-6)
    top10 = torch.topk(nxt, 10).indices.tolist()
    firsts = [tid(tokenizer, " " + a)[0] for a in ex.answers]
    assert row["top1"] == (top10[0] in firsts)
    assert row["top10"] == any(f in top10 for f in firsts)
    assert row["predicted_token"] == tokenizer.decode([top10[0]])


def test_pad_falls_back_to_eos_and_training_mode_restored(model):
    tok = make_tokenizer(with_pad=False)
    assert tok.pad_token_id is None
    examples = mixed_examples()
    model.train()
    try:
        a = score_examples(model, tok, examples, batch_size=8, progress=False)
        assert model.training
    finally:
        model.eval()
    b = score_examples(model, make_tokenizer(), examples, batch_size=1, progress=False)
    assert [r["logprob"] for r in a.per_example if "logprob" in r] == pytest.approx(
        [r["logprob"] for r in b.per_example if "logprob" in r], abs=1e-5
    )


# ---------------------------------------------------------------- crafted logits


def fake_forward(vector, tokenizer, seen):
    """A _forward_logits replacement: same logits at every position; checks the padded batch."""
    pad = tokenizer.pad_token_id

    def _fwd(model, input_ids, attention_mask, position_ids):
        expected_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        assert torch.equal(position_ids, expected_pos)
        assert torch.all(input_ids[attention_mask == 0] == pad)
        for row, mask in zip(input_ids, attention_mask):
            first = int((mask == 0).sum())
            assert mask[first:].all()  # left padding: all padding before the tokens
            assert int(row[first]) == tokenizer.bos_token_id
        seen.append(tuple(input_ids.shape))
        return vector.expand(input_ids.shape[0], input_ids.shape[1], -1).clone()

    return _fwd


def one(tokenizer, text):
    ids = tid(tokenizer, text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_article_metric_with_crafted_logits(tokenizer, monkeypatch):
    the, french, paris, dog = (one(tokenizer, w) for w in (" the", " French", " Paris", " dog"))
    assert the in article_token_ids(tokenizer)
    assert one(tokenizer, " a") in article_token_ids(tokenizer) and one(tokenizer, "The") in article_token_ids(tokenizer)
    vec = torch.zeros(len(tokenizer))
    vec[the], vec[french], vec[paris], vec[dog] = 10.0, 9.0, 1.0, -5.0
    seen = []
    monkeypatch.setattr(ev, "_forward_logits", fake_forward(vec, tokenizer, seen))
    examples = [
        Example("a", "The mother tongue of Danielle Darrieux is", ("French",)),  # model says " the", then " French"
        Example("b", "The mother tongue is", ("the French",)),  # format matches: top1 hit via the article
        Example("c", "the capital of France is", ("Paris",)),  # 3rd place: no top1 either way, top5 yes
        Example("d", "a", ("dog",)),  # far down: nothing
        Example("e", "a dog", ("Paris", "French")),  # several answers: any counts, best logprob
    ]
    res = score_examples(torch.nn.Module(), tokenizer, examples, batch_size=2, progress=False)
    got = {r["id"]: r for r in res.per_example}
    assert [got[i]["top1"] for i in "abcde"] == [False, True, False, False, False]
    assert [got[i]["top1_no_article"] for i in "abcde"] == [True, True, False, False, True]
    assert [got[i]["top5"] for i in "abcde"] == [True, True, True, False, True]
    assert [got[i]["top10"] for i in "abcde"] == [True, True, True, False, True]
    lp = torch.log_softmax(vec, -1)
    assert got["a"]["logprob"] == pytest.approx(float(lp[french]), abs=1e-6)
    assert got["b"]["logprob"] == pytest.approx(float(lp[the] + lp[french]), abs=1e-6)
    assert got["b"]["n_answer_tokens"] == 2
    assert got["b"]["logloss"] == pytest.approx(-float(lp[the] + lp[french]) / 2, abs=1e-6)
    assert got["e"]["logprob"] == pytest.approx(float(lp[french]), abs=1e-6)  # best of Paris/French
    assert got["a"]["predicted_token"] == " the"
    assert res.metrics["top1"] == pytest.approx(1 / 5)
    assert res.metrics["top1_no_article"] == pytest.approx(3 / 5)
    assert res.metrics["top5"] == pytest.approx(4 / 5)
    assert res.metrics["logloss"] == pytest.approx(np.mean([r["logloss"] for r in res.per_example]))
    assert "accuracy" not in res.metrics and res.metrics["n"] == 5
    assert res.hits("top1").tolist() == [False, True, False, False, False]
    # one forward per batch of 2 rows (6 rows: "e" has two answers), last-token of each answer never fed
    assert len(seen) == 3


def test_choice_scoring_with_crafted_logits(tokenizer, monkeypatch):
    paris, dog = one(tokenizer, " Paris"), one(tokenizer, " dog")
    vec = torch.zeros(len(tokenizer))
    vec[paris], vec[dog] = 3.0, -3.0
    monkeypatch.setattr(ev, "_forward_logits", fake_forward(vec, tokenizer, []))
    examples = [
        Example("right", "Q:", ("Paris",), choices=("Paris", "dog"), label=0),
        Example("wrong", "Q:", ("dog",), choices=("Paris", "dog"), label=1),
        Example("gen", "Q:", ("Paris",)),
    ]
    res = score_examples(torch.nn.Module(), tokenizer, examples, batch_size=16, progress=False)
    r, w, g = res.per_example
    lp = torch.log_softmax(vec, -1)
    assert r["choice_logprobs"] == pytest.approx([float(lp[paris]), float(lp[dog])], abs=1e-6)
    assert (r["prediction"], r["accuracy"], r["top1"]) == (0, True, True)
    assert (w["prediction"], w["accuracy"], w["top1"]) == (0, False, False)
    assert "top5" not in r and "accuracy" not in g and g["top1"] is True
    assert res.metrics["accuracy"] == 0.5
    assert res.metrics["top1"] == pytest.approx(2 / 3)  # top1 is defined for every example
    assert res.hits("accuracy").tolist() == [True, False]


def test_strip_leading_article():
    assert strip_leading_article("the French language") == "French language"
    assert strip_leading_article("An apple") == "apple"
    assert strip_leading_article("The") == "The"
    assert strip_leading_article("theology") == "theology"
    assert strip_leading_article("Paris") == "Paris"


# ---------------------------------------------------------------- bootstrap


def test_paired_bootstrap_ci_contains_true_difference_and_is_deterministic():
    rng = np.random.default_rng(123)
    n = 3000
    a = rng.random(n) < 0.30
    b = a.copy()
    flip_up = (~a) & (rng.random(n) < 0.15)  # ~0.105 gained
    b[flip_up] = True
    true_diff = 0.7 * 0.15
    res = paired_bootstrap(a, b, n_resamples=1000, seed=0)
    assert res["n"] == n
    assert res["estimate"] == pytest.approx(b.mean() - a.mean())
    lo, hi = res["ci95"]
    assert lo < true_diff < hi
    assert lo < res["estimate"] < hi
    assert 0 < hi - lo < 0.05
    assert paired_bootstrap(a, b, n_resamples=1000, seed=0) == res
    assert paired_bootstrap(a, b, n_resamples=1000, seed=1)["ci95"] != res["ci95"]
    # no difference at all → degenerate CI at 0
    assert paired_bootstrap(a, a, n_resamples=50)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1])


def test_paired_bootstrap_chunking_matches_formula():
    # with n large enough to force several chunks the CI still brackets the analytic ±1.96·sd/√n
    rng = np.random.default_rng(7)
    n = 5000
    diff = rng.normal(0.2, 1.0, n)
    res = paired_bootstrap(np.zeros(n), diff, n_resamples=2000, seed=3)
    half = 1.96 * diff.std() / math.sqrt(n)
    assert res["ci95"][0] == pytest.approx(diff.mean() - half, abs=0.01)
    assert res["ci95"][1] == pytest.approx(diff.mean() + half, abs=0.01)


def test_score_result_hits_float_and_missing():
    r = ScoreResult(per_example=[{"id": "x", "logprob": -1.5}, {"id": "y", "logprob": -0.5}], metrics={})
    assert r.hits("logprob").dtype == np.float64 and r.hits("logprob").tolist() == [-1.5, -0.5]
    with pytest.raises(KeyError):
        r.hits("top1")


def test_metric_lists_derive_from_the_one_table():
    """Issue 9: one metrics table; the scorers' means, the benchmarks' metric lists, verify's report,
    search's kept metrics and the card's labels all come from it."""
    from laser_export import metrics, verify
    from laser_export.benchmarks import CHOICE_METRICS, FIRST_TOKEN_METRICS, GENERATION_METRICS
    from laser_export.export.card import METRIC_LABELS
    from laser_export.search import KEPT_METRICS

    table = metrics.METRICS
    assert set(FIRST_TOKEN_METRICS) | set(CHOICE_METRICS) | set(GENERATION_METRICS) == set(table)
    assert set(verify.REPORTED) == set(ev._MEAN_METRICS) == set(table)
    assert all("generation" in table[m].kinds for m in GENERATION_METRICS)
    assert set(KEPT_METRICS) - {"n"} == {m for m in table if "generation" not in table[m].kinds}
    assert set(METRIC_LABELS) <= set(table)
    assert not table["logloss"].higher_is_better and table["top1"].higher_is_better
    assert metrics.format_value("top1", 0.5) == "50.00%" and metrics.format_value("logloss", 1.25) == "1.2500"


def test_an_answer_that_tokenises_to_nothing_is_bad_input_naming_the_example(model, tokenizer, monkeypatch):
    """An answer (or its article-stripped form) the tokenizer turns into no tokens: a BenchmarkError (exit 2)
    naming the example — before, the stripped form failed with a bare IndexError."""
    from laser_export.benchmarks.base import BenchmarkError

    real = ev._continuation_ids
    monkeypatch.setattr(ev, "_continuation_ids", lambda tok, text: [] if text == "x" else real(tok, text))
    ex = Example(id="e1", prompt="the capital is", answers=("the x",))
    with pytest.raises(BenchmarkError, match=r"example 'e1': answer 'the x' without its leading article tokenises to nothing"):
        score_examples(model, tokenizer, [ex], progress=False)
    ex2 = Example(id="e2", prompt="the capital is", answers=("x",))
    with pytest.raises(BenchmarkError, match=r"example 'e2': answer/choice 'x' tokenises to nothing"):
        score_examples(model, tokenizer, [ex2], progress=False)
