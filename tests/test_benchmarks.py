import functools
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from laser_export.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    Example,
    examples_sha256,
    load_examples,
    split_examples,
)
from laser_export.benchmarks import bigbench

FIXTURES = Path(__file__).parent / "fixtures"
COUNTERFACT = FIXTURES / "counterfact_small.json"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Isolated ~ so nothing touches the real cache; no $LASER_EXPORT_BIGBENCH."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv(bigbench.ENV_VAR, raising=False)
    return h


# ---------------------------------------------------------------- CounterFact


def test_counterfact_three_prompts_per_record():
    records = json.loads(COUNTERFACT.read_text())
    examples = load_examples("counterfact", str(COUNTERFACT))
    assert len(records) == 6
    assert len(examples) == 3 * len(records)
    first = examples[:3]
    assert first[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert first[1].prompt == records[0]["paraphrase_prompts"][0]
    assert first[2].prompt == records[0]["paraphrase_prompts"][1]
    assert all(ex.answers == ("French",) for ex in first)  # target_true, not target_new ("English")
    assert all(ex.group == "0" for ex in first)
    assert [ex.id for ex in first] == ["counterfact:0:0", "counterfact:0:1", "counterfact:0:2"]
    # subject placed where "{}" was, also at the start of the template
    assert examples[6].prompt == "Toko Yasuda, who plays"
    assert examples[6].answers == ("guitar",)
    for rec, i in zip(records, range(0, 18, 3)):
        assert examples[i].answers == (rec["requested_rewrite"]["target_true"]["str"],)
        assert {ex.group for ex in examples[i : i + 3]} == {str(rec["case_id"])}
        assert examples[i].choices is None and examples[i].label is None


def test_counterfact_max_examples():
    assert len(load_examples("counterfact", str(COUNTERFACT), max_examples=4)) == 4


def test_counterfact_missing_default_file_says_how_to_get(home):
    with pytest.raises(BenchmarkError) as err:
        load_examples("counterfact")
    msg = str(err.value)
    assert str(home / ".cache" / "laser-export" / "counterfact.json") in msg
    assert "rome.baulab.info" in msg


def test_counterfact_bad_record_names_file_and_record(tmp_path):
    bad = json.loads(COUNTERFACT.read_text())
    del bad[2]["requested_rewrite"]["target_true"]
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(BenchmarkError, match=r"record #2.*target_true"):
        load_examples("counterfact", str(p))


def test_counterfact_url_downloads_into_cache(home):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURES))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/counterfact_small.json"
        examples = load_examples("counterfact", url)
        from laser_export.benchmarks.counterfact import cache_path

        cached = cache_path(url)  # keyed by the full URL
        assert home / ".cache" / "laser-export" / "downloads" in cached.parents and cached.name == "counterfact_small.json"
        assert cached.read_bytes() == COUNTERFACT.read_bytes()
        assert examples == load_examples("counterfact", str(COUNTERFACT))
        with pytest.raises(BenchmarkError, match="could not download"):
            load_examples("counterfact", f"http://127.0.0.1:{server.server_port}/nope.json")
        assert not list((home / ".cache" / "laser-export").rglob("nope.json"))
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- registry


def test_registry_and_unknown_name():
    assert set(BENCHMARKS) == {"counterfact", "qa_wikidata", "epistemic_reasoning", "fever", "jsonl", "bios_gender",
                               "bios_profession", "truthfulqa", "fever_paper", "causal_judgement", "web_of_lies",
                               "hotpot_qa"}
    with pytest.raises(BenchmarkError) as err:
        load_examples("counterfactual")
    for name in BENCHMARKS:
        assert name in str(err.value)
    with pytest.raises(BenchmarkError, match="max_examples"):
        load_examples("counterfact", str(COUNTERFACT), max_examples=0)


# ---------------------------------------------------------------- splits


def _grouped(n_groups=50, per_group=3):
    return [
        Example(id=f"{g}:{k}", prompt=f"p{g}-{k}", answers=("a",), group=str(g))
        for g in range(n_groups)
        for k in range(per_group)
    ]


def test_split_is_deterministic_and_seed_dependent():
    ex = _grouped()
    a = split_examples(ex, seed=0, validation_fraction=0.2)
    b = split_examples(ex, seed=0, validation_fraction=0.2)
    c = split_examples(ex, seed=1, validation_fraction=0.2)
    assert a.validation == b.validation and a.test == b.test
    assert a.info("test") == b.info("test")
    assert {e.group for e in a.validation} != {e.group for e in c.validation}
    assert a.info("test")["examples_sha256"] != c.info("test")["examples_sha256"]
    assert a.info("validation")["examples_sha256"] != c.info("validation")["examples_sha256"]
    # round(0.2 * 50) = 10 groups of 3
    assert a.info("test")["sizes"] == {"validation": 30, "test": 120}
    assert a.info("test")["seed"] == 0 and a.info("test")["validation_fraction"] == 0.2
    assert a.info("test")["examples_sha256"] == examples_sha256(a.test)
    assert len(a.info("test")["examples_sha256"]) == 64
    # it really is random.Random(seed).shuffle over groups in first-appearance order
    import random

    order = [str(g) for g in range(50)]
    random.Random(0).shuffle(order)
    assert {e.group for e in a.validation} == set(order[:10])


def test_split_groups_never_straddle_and_partition():
    ex = _grouped(n_groups=37, per_group=3)
    for seed in range(5):
        s = split_examples(ex, seed=seed, validation_fraction=0.3)
        val_groups = {e.group for e in s.validation}
        test_groups = {e.group for e in s.test}
        assert not val_groups & test_groups
        assert len(val_groups) == round(0.3 * 37)
        assert sorted(e.id for e in s.validation + s.test) == sorted(e.id for e in ex)


def test_split_seed_none_is_paper_protocol_first_fraction():
    ex = load_examples("counterfact", str(COUNTERFACT))
    s = split_examples(ex, seed=None, validation_fraction=0.5)
    assert [e.group for e in s.validation] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    assert s.test == ex[9:]
    assert s.info("validation")["seed"] is None


def test_split_sha_changes_with_content_and_ungrouped_examples():
    ex = [Example(id=str(i), prompt=f"p{i}", answers=("x",)) for i in range(10)]
    s = split_examples(ex, seed=3, validation_fraction=0.2)
    assert len(s.validation) == 2 and len(s.test) == 8  # group=None → each example its own group
    altered = [Example(id=e.id, prompt=e.prompt, answers=("y",)) for e in ex]
    s2 = split_examples(altered, seed=3, validation_fraction=0.2)
    assert [e.id for e in s2.test] == [e.id for e in s.test]
    assert s2.info("test")["examples_sha256"] != s.info("test")["examples_sha256"]
    with pytest.raises(ValueError):
        s.info("train")
    with pytest.raises(ValueError):
        split_examples(ex, seed=0, validation_fraction=1.5)


# ---------------------------------------------------------------- JSONL


def test_jsonl_parsing(tmp_path):
    p = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "The capital of France is", "answer": "Paris"},
        {"prompt": "The capital of Peru is", "answers": ["Lima", "Lima, Peru"], "id": "peru", "group": "g1"},
        "",
        {"prompt": "Is the sky green? Answer:", "choices": ["yes", "no"], "label": 1, "meta": {"src": "me"}},
    ]
    p.write_text("\n".join(json.dumps(l) if l else "" for l in lines) + "\n")
    ex = load_examples("jsonl", str(p))
    assert ex == [
        Example(id="line1", prompt="The capital of France is", answers=("Paris",)),
        Example(id="peru", prompt="The capital of Peru is", answers=("Lima", "Lima, Peru"), group="g1"),
        Example(id="line4", prompt="Is the sky green? Answer:", answers=("no",), choices=("yes", "no"), label=1),
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "x", "answer": "y"', "invalid JSON"),
        ('{"prompt": "x"}', "needs 'answer'"),
        ('{"prompt": "x", "choices": ["a", "b"], "label": 2}', "'label' must be an integer index"),
        ('{"prompt": "x", "anwser": "y"}', "unknown key"),
        ('["x"]', "expected a JSON object"),
        ('{"prompt": "x", "answers": []}', "non-empty list"),
    ],
)
def test_jsonl_error_names_file_and_line(tmp_path, bad_line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "answer": "fine"}\n\n' + bad_line + "\n")
    with pytest.raises(BenchmarkError) as err:
        load_examples("jsonl", str(p))
    assert f"{p}:3" in str(err.value)
    assert message in str(err.value)


def test_jsonl_duplicate_ids_and_missing_file(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"prompt": "a", "answer": "b", "id": "x"}\n{"prompt": "c", "answer": "d", "id": "x"}\n')
    with pytest.raises(BenchmarkError, match="duplicate example id 'x'"):
        load_examples("jsonl", str(p))
    with pytest.raises(BenchmarkError, match="file not found"):
        load_examples("jsonl", str(tmp_path / "nope.jsonl"))
    with pytest.raises(BenchmarkError, match="path"):
        load_examples("jsonl")


# ---------------------------------------------------------------- BigBench (fixture tarball)

QA_TASK = {
    "name": "qa_wikidata",
    "example_input_prefix": "\n",
    "example_output_prefix": " ",
    "examples": [
        {"input": 'The genre of "Weird Al" Yankovic is', "target": ["comedy", "parody"]},
        {"input": "The country of 11 de marzo de 2004 is", "target": "Spain"},
    ],
}
EPISTEMIC_TASK = {
    "name": "epistemic_reasoning",
    "task_prefix": "Identify the relation between the following premises and hypotheses.\n",
    "example_input_prefix": "\n",
    "example_output_prefix": "\nRelation: ",
    "choice_prefix": " option: ",
    "examples": [
        {"input": "Premise: A knows that B runs. Hypothesis: B runs.", "target_scores": {"entailment": 1, "non-entailment": 0}},
        {"input": "Premise: A thinks that B runs. Hypothesis: B runs.", "target_scores": {"entailment": 0, "non-entailment": 1}},
    ],
}
FEVER_TASK = {
    "name": "fever",
    "example_input_prefix": "",
    "examples": [
        {"id": 163803, "input": "On June 2017, the following claim was made: X.\nQ: Was this claim true or false?", "target_scores": {"true": 1, "false": 0}},
        {"id": 202314, "input": "On June 2017, the following claim was made: Y.\nQ: Was this claim true or false?", "target_scores": {"true": 0, "false": 1}},
    ],
}


def _make_tarball(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in [("setup.py", None)] + [
            (f"bigbench/benchmark_tasks/{r}/task.json", d) for r, d in tasks.items()
        ]:
            payload = b"# setup\n" if data is None else json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{rel}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def bb_tarball(tmp_path):
    return _make_tarball(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {"qa_wikidata": QA_TASK, "epistemic_reasoning": EPISTEMIC_TASK, "fact_checker/fever": FEVER_TASK},
    )


def test_bigbench_generative_string_and_list_targets(home, bb_tarball):
    ex = load_examples("qa_wikidata", str(bb_tarball))
    assert ex == [
        Example(id="qa_wikidata:0", prompt='The genre of "Weird Al" Yankovic is', answers=("comedy", "parody")),
        Example(id="qa_wikidata:1", prompt="The country of 11 de marzo de 2004 is", answers=("Spain",)),
    ]


def test_bigbench_choice_tasks_prompt_ends_where_choice_starts(home, bb_tarball):
    er = load_examples("epistemic_reasoning", str(bb_tarball))
    assert er[0].prompt == (
        "Identify the relation between the following premises and hypotheses.\n"
        "\nPremise: A knows that B runs. Hypothesis: B runs.\nRelation:"
    )
    assert er[0].choices == ("entailment", "non-entailment") and er[0].label == 0
    assert er[1].label == 1 and er[1].answers == ("non-entailment",)
    fever = load_examples("fever", str(bb_tarball))
    # no example_output_prefix in the task → BigBench default "\nA: " (trailing space left to the scorer)
    assert fever[0].prompt.endswith("Was this claim true or false?\nA:")
    assert fever[0].prompt.startswith("On June 2017")
    assert [(e.id, e.choices, e.label) for e in fever] == [
        ("fever:163803", ("true", "false"), 0),
        ("fever:202314", ("true", "false"), 1),
    ]


def test_bigbench_extracted_cache_is_used(home, bb_tarball):
    first = load_examples("fever", str(bb_tarball))
    cache = bb_tarball.parent / "bigbench"
    # one pass over the tarball caches every known task
    assert sorted(p.name for p in cache.iterdir()) == ["epistemic_reasoning.json", "fever.json", "qa_wikidata.json"]
    # the cache is what is read now: break the tarball (keeping it older than the cache)
    st = bb_tarball.stat()
    bb_tarball.write_bytes(b"not a tarball")
    os.utime(bb_tarball, (st.st_atime, st.st_mtime - 100))
    assert load_examples("fever", str(bb_tarball)) == first
    # a newer archive invalidates the cache
    os.utime(bb_tarball, (st.st_atime, st.st_mtime + 100))
    with pytest.raises(BenchmarkError, match="cannot read archive"):
        load_examples("fever", str(bb_tarball))


def test_bigbench_env_var_and_task_json_path(home, bb_tarball, tmp_path, monkeypatch):
    monkeypatch.setenv(bigbench.ENV_VAR, str(bb_tarball))
    assert len(load_examples("qa_wikidata")) == 2
    task_json = tmp_path / "task.json"
    task_json.write_text(json.dumps(EPISTEMIC_TASK))
    assert load_examples("epistemic_reasoning", str(task_json)) == load_examples("epistemic_reasoning")


def test_bigbench_missing_archive_message(home):
    with pytest.raises(BenchmarkError) as err:
        load_examples("qa_wikidata")
    msg = str(err.value)
    # the sdist left PyPI: the message says so and names the two ways that still work
    assert "left PyPI" in msg and "bigbench-1.0.0.tar.gz" in msg and "task.json" in msg and "benchmark.path" in msg
    assert "qa_wikidata" in msg and "LASER_EXPORT_BIGBENCH" in msg


def test_bigbench_archive_without_task(home, tmp_path):
    tb = _make_tarball(tmp_path / "bigbench-1.0.0.tar.gz", {"qa_wikidata": QA_TASK})
    with pytest.raises(BenchmarkError, match="fact_checker/fever/task.json"):
        load_examples("fever", str(tb))


# ---------------------------------------------------------------- BigBench (real archive)


@pytest.mark.slow
def test_bigbench_real_archive(bigbench_archive):
    qa = load_examples("qa_wikidata")
    assert len(qa) == 20442
    assert qa[0].prompt == 'The genre of "Weird Al" Yankovic is' and qa[0].answers == ("comedy", "parody")
    assert sum(len(e.answers) > 1 for e in qa) == 1509
    er = load_examples("epistemic_reasoning")
    assert len(er) == 2000 and er[0].choices == ("entailment", "non-entailment") and er[0].label == 1
    assert er[0].prompt.endswith("\nRelation:")
    fever = load_examples("fever")
    assert len(fever) == 6612 and fever[0].id == "fever:163803" and fever[0].label == 0
    assert fever[2].label == 1
