"""The LASER paper's Hub benchmarks, with its prompts (``pratyushasharma/laser``, ``src/dataset_utils/``
and the ``intervention_<model>_<dataset>.py`` scripts).

Each loader returns :class:`Example` objects whose ``prompt`` is the paper's GPT-J/Llama-2 prompt and,
where the paper's RoBERTa script words it differently, ``masked_prompt`` its RoBERTa prompt
(``{mask}`` marks the mask token). Data comes from the Hub through ``datasets``, or from a local copy
in the Hub's layout (``benchmark.path``, see :mod:`laser_export.benchmarks.hub`). Example order is
the paper's (its validation part first), so ``seed: null`` reproduces its unshuffled 20/80 split.
"""

from __future__ import annotations

import os
import re

from .base import BenchmarkError, Example
from .hub import field, load_rows

#: Hub revisions passed to ``datasets.load_dataset`` (None = the default branch). The verify report
#: records the SHA-256 of the exact examples scored, which pins the data whatever the revision.
REVISIONS: dict[str, str | None] = {
    "LabHC/bias_in_bios": None,
    "truthfulqa/truthful_qa": None,
    "hotpotqa/hotpot_qa": None,
    "EleutherAI/fever": None,
    "tasksource/bigbench": None,
    "lighteval/big_bench_hard": None,
}

# --------------------------------------------------------------------------- Bias in Bios

BIOS_REPO = "LabHC/bias_in_bios"
#: LabHC/bias_in_bios ``profession`` labels (dataset card)
BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian", "dj",
    "filmmaker", "interior designer", "journalist", "model", "nurse", "painter", "paralegal", "pastor",
    "personal trainer", "photographer", "physician", "poet", "professor", "psychologist", "rapper",
    "software engineer", "surgeon", "teacher", "yoga teacher",
)
#: the paper keeps the professions whose name is one token (``BiasBiosOccupation.occupations``)
PAPER_PROFESSIONS = ("journalist", "poet", "composer", "model", "teacher", "architect", "painter", "professor")
GENDERS = ("male", "female")  # gender 0 = male, 1 = female


def _sentence(text: str) -> str:
    """The paper's ``text.strip()`` followed by ``.`` unless it already ends with ``.`` or ``?``."""
    text = text.strip()
    return text if text.endswith((".", "?")) else text + "."


def _bios_rows(path):
    return load_rows("bios", BIOS_REPO, None, "dev", path, REVISIONS[BIOS_REPO])


def load_bios_gender(path: str | os.PathLike | None = None) -> list[Example]:
    """Bias in Bios ``dev`` split, gender (male/female) compared at the next token / the mask."""
    out = []
    for i, row in enumerate(_bios_rows(path)):
        text = field(row, "hard_text", "bios_gender", f"row {i}")
        gender = field(row, "gender", "bios_gender", f"row {i}")
        if gender not in (0, 1):
            raise BenchmarkError(f"bios_gender: row {i}: gender must be 0 or 1, got {gender!r}")
        bio = _sentence(text)
        out.append(Example(
            id=f"bios_gender:{i}",
            prompt=f"Consider the following text: {bio} Is the person in this text a male or female? "
                   "The gender of this person is",
            answers=(GENDERS[gender],), choices=GENDERS, label=gender,
            masked_prompt=f"Consider the following text: {bio} Is the person in this text a male or female? "
                          "This person is {mask}.",
        ))
    return out


def load_bios_profession(path: str | os.PathLike | None = None) -> list[Example]:
    """Bias in Bios ``dev`` split restricted to the paper's 8 one-token professions; the prediction is
    the profession with the highest score among those 8."""
    out = []
    for i, row in enumerate(_bios_rows(path)):
        text = field(row, "hard_text", "bios_profession", f"row {i}")
        prof = field(row, "profession", "bios_profession", f"row {i}")
        if not (isinstance(prof, int) and 0 <= prof < len(BIOS_PROFESSIONS)):
            raise BenchmarkError(f"bios_profession: row {i}: profession must be 0..27, got {prof!r}")
        name = BIOS_PROFESSIONS[prof]
        if name not in PAPER_PROFESSIONS:
            continue
        bio = _sentence(text)
        out.append(Example(
            id=f"bios_profession:{i}",
            prompt=f"Consider the following text: {bio} What is the profession of the person in this text? "
                   "The profession of this person is",
            answers=(name,), choices=PAPER_PROFESSIONS, label=PAPER_PROFESSIONS.index(name),
            masked_prompt=f"Consider the following text: {bio} The profession of the person in the text is called {{mask}}.",
        ))
    return out


# --------------------------------------------------------------------------- TruthfulQA

TRUTHFULQA_REPO = "truthfulqa/truthful_qa"
TRUE_FALSE = ("false", "true")  # label 1 = true, as the paper's labels_ans


def load_truthfulqa(path: str | os.PathLike | None = None) -> list[Example]:
    """TruthfulQA ``multiple_choice`` validation: every ``mc2_targets`` choice becomes one true/false
    statement ``question + " " + answer`` (+ ``.``) followed by the paper's question (verbatim,
    including its missing space before "Is"). The statements of one question form one split group."""
    rows = load_rows("truthfulqa", TRUTHFULQA_REPO, "multiple_choice", "validation", path, REVISIONS[TRUTHFULQA_REPO])
    out = []
    for i, row in enumerate(rows):
        question = field(row, "question", "truthfulqa", f"row {i}")
        mc2 = field(row, "mc2_targets", "truthfulqa", f"row {i}")
        choices, labels = mc2.get("choices"), mc2.get("labels")
        if not choices or len(choices) != len(labels or []) or 1 not in labels:
            raise BenchmarkError(f"truthfulqa: row {i}: mc2_targets needs choices and labels of equal length, one true")
        for j, (answer, label) in enumerate(zip(choices, labels)):
            statement = f"{question} {answer}"
            if not statement.endswith("."):
                statement += "."
            prompt = statement + "Is this statement true or false? This statement is"
            out.append(Example(id=f"truthfulqa:{i}:{j}", prompt=prompt, answers=(TRUE_FALSE[label],),
                               choices=TRUE_FALSE, label=int(label), group=f"q{i}"))
    return out


# --------------------------------------------------------------------------- FEVER (the paper's)

FEVER_REPO = "EleutherAI/fever"
_FEVER_LABELS = {"REFUTES": 0, "SUPPORTS": 1}


def _fever_label(value, where: str) -> int | None:
    """0 = false (REFUTES), 1 = true (SUPPORTS); NOT ENOUGH INFO -> None (dropped)."""
    if isinstance(value, str):
        if value == "NOT ENOUGH INFO":
            return None
        if value in _FEVER_LABELS:
            return _FEVER_LABELS[value]
    elif value in (0, 1):
        return int(value)
    raise BenchmarkError(f"fever_paper: {where}: label must be 0/1 or SUPPORTS/REFUTES, got {value!r}")


def _consistent_unique(rows, split: str) -> list[tuple[str, int]]:
    """One entry per claim whose rows all carry the same label, in first-appearance order."""
    labels: dict[str, set[int]] = {}
    for i, row in enumerate(rows):
        claim = field(row, "claim", "fever_paper", f"{split} row {i}")
        label = _fever_label(field(row, "label", "fever_paper", f"{split} row {i}"), f"{split} row {i}")
        if label is not None:
            labels.setdefault(claim, set()).add(label)
    return [(claim, next(iter(ls))) for claim, ls in labels.items() if len(ls) == 1]


def load_fever_paper(path: str | os.PathLike | None = None) -> list[Example]:
    """EleutherAI/fever v1.0 ``paper_dev`` + ``paper_test`` (the NAACL paper's dev/test), one example
    per claim with a consistent label (duplicates and conflicting claims removed), dev first."""
    rev = REVISIONS[FEVER_REPO]
    dev = _consistent_unique(load_rows("fever_paper", FEVER_REPO, "v1.0", "paper_dev", path, rev), "paper_dev")
    test = _consistent_unique(load_rows("fever_paper", FEVER_REPO, "v1.0", "paper_test", path, rev), "paper_test")
    shared = {c for c, _ in dev} & {c for c, _ in test}
    if shared:
        raise BenchmarkError(f"fever_paper: paper_dev and paper_test share {len(shared)} claims")
    out = []
    for part, items in (("paper_dev", dev), ("paper_test", test)):
        for k, (claim, label) in enumerate(items):
            c = _sentence(claim)
            out.append(Example(
                id=f"fever_paper:{part}:{k}",
                prompt=f"Consider the following claim: {c} Is this claim true or false. The claim is",
                answers=(TRUE_FALSE[label],), choices=TRUE_FALSE, label=label,
            ))
    return out


# --------------------------------------------------------------------------- BigBench(-Hard) Yes/No tasks

YES_NO = ("Yes", "No")


def _yes_no(name, rows, input_key, target_key, prefix):
    out = []
    for i, row in enumerate(rows):
        prompt = field(row, input_key, name, f"row {i}")
        target = field(row, target_key, name, f"row {i}")
        if isinstance(target, list):
            if len(target) != 1:
                raise BenchmarkError(f"{name}: row {i}: expected one target, got {target!r}")
            target = target[0]
        if target not in YES_NO:
            raise BenchmarkError(f"{name}: row {i}: target must be Yes or No, got {target!r}")
        out.append(Example(id=f"{name}:{prefix}{i}", prompt=prompt.strip(), answers=(target,), choices=YES_NO,
                           label=YES_NO.index(target)))
    return out


def load_causal_judgement(path: str | os.PathLike | None = None) -> list[Example]:
    """BigBench causal_judgment as the paper loads it (``tasksource/bigbench``, validation then train)."""
    repo = "tasksource/bigbench"
    out = []
    for split in ("validation", "train"):
        rows = load_rows("causal_judgement", repo, "causal_judgment", split, path, REVISIONS[repo])
        out += _yes_no("causal_judgement", rows, "inputs", "targets", f"{split}:")
    return out


def load_web_of_lies(path: str | os.PathLike | None = None) -> list[Example]:
    """BigBench-Hard web_of_lies (``lighteval/big_bench_hard``, its one ``train`` split)."""
    repo = "lighteval/big_bench_hard"
    return _yes_no("web_of_lies", load_rows("web_of_lies", repo, "web_of_lies", "train", path, REVISIONS[repo]),
                   "input", "target", "")


# --------------------------------------------------------------------------- HotpotQA

HOTPOT_REPO = "hotpotqa/hotpot_qa"
HOTPOT_MAX_ANSWER_WORDS = 15
_WORD = re.compile(r"\S+")


def _hotpot_example(row, i, part) -> Example | None:
    question = field(row, "question", "hotpot_qa", f"{part} row {i}").strip()
    answer = field(row, "answer", "hotpot_qa", f"{part} row {i}").strip()
    if not answer or len(_WORD.findall(answer)) > HOTPOT_MAX_ANSWER_WORDS:
        return None
    prompt = f"{question} The answer is" if question.endswith(("?", ".")) else f"{question}? The answer is"
    return Example(id=f"hotpot_qa:{part}:{field(row, 'id', 'hotpot_qa', f'{part} row {i}')}", prompt=prompt,
                   answers=(answer,))


def load_hotpot_qa(path: str | os.PathLike | None = None) -> list[Example]:
    """HotpotQA ``fullwiki``: as many ``train`` rows as ``validation`` has (the test split has no
    answers), then ``validation``; answers of at most 15 words. Scored by greedy generation."""
    rev = REVISIONS[HOTPOT_REPO]
    validation = load_rows("hotpot_qa", HOTPOT_REPO, "fullwiki", "validation", path, rev)
    train = load_rows("hotpot_qa", HOTPOT_REPO, "fullwiki", "train", path, rev)[: len(validation)]
    out = []
    for part, rows in (("train", train), ("validation", validation)):
        for i, row in enumerate(rows):
            ex = _hotpot_example(row, i, part)
            if ex is not None:
                out.append(ex)
    return out
