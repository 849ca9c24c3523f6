"""User benchmarks as JSON Lines.

One JSON object per line (blank lines are skipped)::

    {"prompt": "The capital of France is", "answer": "Paris"}
    {"prompt": "The capital of Peru is", "answers": ["Lima", "Lima, Peru"], "id": "peru", "group": "capitals"}
    {"prompt": "Is the sky green? Answer:", "choices": ["yes", "no"], "label": 1}

Keys: ``prompt`` (required); exactly one of ``answer`` (string) / ``answers`` (list of strings), or
``choices`` (list of strings) with ``label`` (0-based index of the correct choice); optional ``id``
(default ``line<N>``), ``group`` (the unit of splitting) and ``meta`` (ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import BenchmarkError, Example, check_unique_ids

#: The longest line read (bytes): a longer one is refused before it is held, decoded or tokenised whole.
MAX_LINE_BYTES = 16 * 2**20

ALLOWED_KEYS = ("prompt", "answer", "answers", "choices", "label", "id", "group", "meta")


def _str_list(value, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise BenchmarkError(f"{where}: {key!r} must be a non-empty list of non-empty strings")
    return tuple(value)


def parse_line(obj, where: str, default_id: str) -> Example:
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(ALLOWED_KEYS))
    if unknown:
        raise BenchmarkError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(ALLOWED_KEYS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BenchmarkError(f"{where}: 'prompt' must be a non-empty string (not only whitespace)")
    ex_id = obj.get("id", default_id)
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
        raise BenchmarkError(f"{where}: 'id' must be a string or integer")
    group = obj.get("group")
    if group is not None and not isinstance(group, (str, int)):
        raise BenchmarkError(f"{where}: 'group' must be a string or integer")
    if "answer" in obj and "answers" in obj:
        raise BenchmarkError(f"{where}: give either 'answer' or 'answers', not both")

    choices = label = None
    if "choices" in obj:
        choices = _str_list(obj["choices"], "choices", where)
        label = obj.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise BenchmarkError(
                f"{where}: 'label' must be an integer index into 'choices' (0..{len(choices) - 1}), got {label!r}"
            )
        if "answer" in obj or "answers" in obj:
            raise BenchmarkError(f"{where}: a choice example takes 'choices' + 'label', not 'answer(s)'")
        answers = (choices[label],)
    elif "label" in obj:
        raise BenchmarkError(f"{where}: 'label' given without 'choices'")
    elif "answer" in obj:
        if not isinstance(obj["answer"], str) or not obj["answer"].strip():
            raise BenchmarkError(f"{where}: 'answer' must be a non-empty string")
        answers = (obj["answer"],)
    elif "answers" in obj:
        answers = _str_list(obj["answers"], "answers", where)
    else:
        raise BenchmarkError(f"{where}: needs 'answer', 'answers', or 'choices' + 'label'")
    return Example(
        id=str(ex_id),
        prompt=prompt,
        answers=answers,
        choices=choices,
        label=label,
        group=None if group is None else str(group),
    )


def load(path: str | os.PathLike | None) -> list[Example]:
    if path is None:
        raise BenchmarkError("jsonl: a path to a .jsonl file is required (path=...)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise BenchmarkError(f"jsonl: file not found: {p}")
    out: list[Example] = []
    try:
        f = open(p, "rb")
    except OSError as exc:
        raise BenchmarkError(f"jsonl: cannot read {p}: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"jsonl: {p}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise BenchmarkError(f"{where}: line longer than {MAX_LINE_BYTES // 2**20} MiB (one example per line; "
                                     "no model scores a prompt that long)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BenchmarkError(f"{where}: not UTF-8 text (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            if "\0" in line:
                raise BenchmarkError(f"{where}: binary data (NUL byte); expected one JSON object per line")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise BenchmarkError(f"{where}: JSON nested too deeply") from None
            out.append(parse_line(obj, where, default_id=f"line{lineno}"))
    if not out:
        raise BenchmarkError(f"jsonl: {p} contains no examples")
    check_unique_ids(out, f"jsonl: {p}")
    return out
