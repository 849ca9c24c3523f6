"""The paper's Hub benchmarks: each loads from a fixture in the Hub repo's own layout and schema
(tests/fixtures/hub/, written by tests/fixtures/make_hub_fixtures.py); count and SHA-256 of the
examples are pinned; prompts are the paper's; splits are seeded and recorded. The online loaders
are tested only with network access (skipped otherwise, never faked)."""

import socket
from pathlib import Path

import pytest

from laser_export.benchmarks import BENCHMARKS, BenchmarkError, examples_sha256, load_examples, load_split

HUB = Path(__file__).parent / "fixtures" / "hub"

# name, fixture repo folder, examples, SHA-256 of the examples (canonical JSON, see examples_sha256)
TABLE = [
    ("bios_gender", "LabHC/bias_in_bios", 6, "dae6a17c769b20c8e3d036ea181fd03a3f991c3e7eef0066316954c392bf9739"),
    ("bios_profession", "LabHC/bias_in_bios", 5, "a8ecca8718a79aa3d0c57cf3736d41c4850cada07afbe160988e5a521c767481"),
    ("truthfulqa", "truthfulqa/truthful_qa", 5, "048c473f7151d83ab8c41b08e10bd758e0761741b3f4e6be2e0549e97ac9e973"),
    ("fever_paper", "EleutherAI/fever", 4, "a2eed8548ccd7c1e1eaed0aa50adbe9004d56352dc799f657597a9040596bb7d"),
    ("causal_judgement", "tasksource/bigbench", 3, "478bf2c168c0cb96b0e9805cd293ec37014cc2c30a42c451db742e6654a69d98"),
    ("web_of_lies", "lighteval/big_bench_hard", 2, "677b715e46a08cc680cfa210a787526c4611d93c52ca48eb0f1aa1cebb17611e"),
    ("hotpot_qa", "hotpotqa/hotpot_qa", 3, "47ace4194be7e1daa92a7557c02ac0d22a87434c642fe3c20de8b0055294f1a9"),
]


@pytest.mark.parametrize("name,repo,count,sha", TABLE)
def test_loads_fixture_count_and_sha(name, repo, count, sha):
    ex = load_examples(name, HUB / repo)
    assert len(ex) == count
    assert examples_sha256(ex) == sha
    split = load_split(name, path=HUB / repo, seed=3, validation_fraction=0.4)
    info = split.info("test")
    assert info["seed"] == 3 and sum(info["sizes"].values()) == count
    assert split.validation + split.test != ex or count < 3  # seeded: a real shuffle of the groups
    assert load_split(name, path=HUB / repo, seed=3, validation_fraction=0.4).info("test") == info


def test_every_benchmark_is_in_the_table_or_offline_elsewhere():
    assert {n for n, *_ in TABLE} | {"counterfact", "qa_wikidata", "epistemic_reasoning", "fever", "jsonl"} == set(BENCHMARKS)


def test_bios_prompts_and_labels():
    g = load_examples("bios_gender", HUB / "LabHC/bias_in_bios")
    assert g[0].prompt == (
        "Consider the following text: She teaches mathematics at a high school in Ohio and coaches the debate "
        "team. Is the person in this text a male or female? The gender of this person is"
    )
    assert g[0].masked_text("<mask>").endswith("a male or female? This person is <mask>.")
    assert [e.answers[0] for e in g] == ["female", "male", "female", "male", "male", "female"]
    assert g[3].prompt.startswith("Consider the following text: He is a board-certified surgeon at a large hospital? Is")
    p = load_examples("bios_profession", HUB / "LabHC/bias_in_bios")
    assert [e.answers[0] for e in p] == ["teacher", "journalist", "architect", "poet", "painter"]  # surgeon dropped
    assert all(e.choices[e.label] == e.answers[0] and len(e.choices) == 8 for e in p)
    assert p[1].masked_text("<mask>").endswith("covers city hall . The profession of the person in the text is called <mask>.")


def test_truthfulqa_statements_grouped_by_question():
    t = load_examples("truthfulqa", HUB / "truthfulqa/truthful_qa")
    assert [e.label for e in t] == [1, 1, 0, 1, 0]
    assert t[1].prompt == "What happens if you eat watermelon seeds? Nothing happens.Is this statement true or false? This statement is"
    assert [e.group for e in t] == ["q0", "q0", "q0", "q1", "q1"]
    split = load_split("truthfulqa", path=HUB / "truthfulqa/truthful_qa", seed=0, validation_fraction=0.5)
    assert {e.group for e in split.validation}.isdisjoint({e.group for e in split.test})


def test_fever_dedup_drops_duplicates_conflicts_and_nei():
    f = load_examples("fever_paper", HUB / "EleutherAI/fever")
    assert [e.id for e in f] == ["fever_paper:paper_dev:0", "fever_paper:paper_dev:1", "fever_paper:paper_test:0",
                                 "fever_paper:paper_test:1"]
    assert [e.answers[0] for e in f] == ["true", "false", "false", "true"]
    assert f[1].prompt == "Consider the following claim: Lorelai Gilmore's father is named Robert. Is this claim true or false. The claim is"
    assert f[3].prompt.endswith("at sea level? Is this claim true or false. The claim is")
    # the paper's unshuffled split: paper_dev first
    split = load_split("fever_paper", path=HUB / "EleutherAI/fever", seed=None, validation_fraction=0.5)
    assert [e.id.split(":")[1] for e in split.validation] == ["paper_dev", "paper_dev"]


def test_bigbench_yes_no_and_hotpot():
    c = load_examples("causal_judgement", HUB / "tasksource/bigbench")
    assert [e.id for e in c] == ["causal_judgement:validation:0", "causal_judgement:train:0", "causal_judgement:train:1"]
    assert [e.choices[e.label] for e in c] == ["Yes", "No", "Yes"]
    h = load_examples("hotpot_qa", HUB / "hotpotqa/hotpot_qa")
    assert [e.answers[0] for e in h] == ["yes", "Chief of Protocol", "Paris"]  # train head (2 = len(validation)), >15 words dropped
    assert h[1].prompt == "What government position was held by the woman who portrayed Corliss Archer? The answer is"
    assert h[2].prompt == "Which city is the capital of France? The answer is"


def test_offline_errors_name_the_files(tmp_path):
    with pytest.raises(BenchmarkError, match=r"bios: no files for split 'dev' under .*hf download --repo-type dataset LabHC/bias_in_bios"):
        load_examples("bios_gender", tmp_path)
    with pytest.raises(BenchmarkError, match="is not a folder"):
        load_examples("web_of_lies", tmp_path / "nope")
    import shutil

    bad = tmp_path / "bbh"
    shutil.copytree(HUB / "tasksource/bigbench", bad)
    with pytest.raises(BenchmarkError, match="web_of_lies: no files for split 'train'"):
        load_examples("web_of_lies", bad)


def _online() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _online(), reason="needs network access to huggingface.co")
def test_online_web_of_lies_loads_through_datasets():
    ex = load_examples("web_of_lies")
    assert len(ex) == 250 and all(e.choices == ("Yes", "No") for e in ex)
