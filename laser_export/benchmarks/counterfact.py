"""CounterFact (Meng et al., ROME) as used by the LASER paper.

Each record yields three generative examples sharing one group (the record's ``case_id``): the rewrite
prompt formatted with the subject, and the two paraphrase prompts. The accepted answer is the *true*
fact ``requested_rewrite.target_true.str`` (the scorer prepends the space).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..atomic import open_atomic
from .base import BenchmarkError, Example, cache_dir

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


def default_path() -> Path:
    return cache_dir() / "counterfact.json"


def _how_to_get() -> str:
    return (
        f"download it with `curl -L -o {default_path()} {COUNTERFACT_URL}` "
        f"or pass path={COUNTERFACT_URL!r} (downloaded into {cache_dir()})"
    )


def cache_path(url: str) -> Path:
    """Where ``url`` is cached: keyed by the full URL (two URLs ending in the same file name never
    share an entry): ``~/.cache/laser-export/downloads/<sha256(url)[:16]>/<file name>``."""
    name = Path(urllib.parse.urlparse(url).path).name or "counterfact.json"
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "downloads" / key / name


def download(url: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` into the cache directory (once per URL) and return the local file."""
    dest = cache_path(url)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_atomic(dest, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BenchmarkError(
            f"counterfact: could not download {url} into {dest}: {exc}. "
            f"Without network access, fetch the file elsewhere and pass its local path."
        ) from exc
    return dest


def resolve_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        p = default_path()
        if not p.is_file():
            raise BenchmarkError(f"counterfact: no file at {p}; {_how_to_get()}")
        return p
    s = str(path)
    if s.startswith(("http://", "https://")):
        return download(s)
    p = Path(s).expanduser()
    if not p.is_file():
        raise BenchmarkError(f"counterfact: file not found: {p}; {_how_to_get()}")
    return p


def _record_examples(rec: dict, index: int, source: str) -> list[Example]:
    try:
        case_id = rec["case_id"]
        rw = rec["requested_rewrite"]
        template, subject = rw["prompt"], rw["subject"]
        answer = rw["target_true"]["str"]
        paraphrases = rec["paraphrase_prompts"]
    except (KeyError, TypeError) as exc:
        raise BenchmarkError(
            f"counterfact: {source}: record #{index} is missing field {exc} "
            "(expected case_id, requested_rewrite.{prompt,subject,target_true.str}, paraphrase_prompts)"
        ) from None
    if not isinstance(subject, str) or not subject.strip():
        raise BenchmarkError(
            f"counterfact: {source}: record #{index} (case_id {case_id}): requested_rewrite.subject must be a non-empty string"
        )
    if not isinstance(template, str) or "{}" not in template:
        raise BenchmarkError(
            f"counterfact: {source}: record #{index} (case_id {case_id}): "
            f"requested_rewrite.prompt must contain '{{}}', got {template!r}"
        )
    if not isinstance(paraphrases, list) or not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise BenchmarkError(
            f"counterfact: {source}: record #{index} (case_id {case_id}): paraphrase_prompts must be a list of strings"
        )
    if not isinstance(answer, str) or not answer.strip():
        raise BenchmarkError(
            f"counterfact: {source}: record #{index} (case_id {case_id}): empty target_true.str"
        )
    prompts = [template.replace("{}", subject, 1)] + list(paraphrases)
    group = str(case_id)
    return [
        Example(id=f"counterfact:{case_id}:{k}", prompt=p, answers=(answer,), group=group,
                masked_prompt=p + ("{mask}." if p.endswith(" ") else " {mask}."))  # the paper's RoBERTa prompt
        for k, p in enumerate(prompts)
    ]


def load(path: str | os.PathLike | None = None) -> list[Example]:
    """Load CounterFact from a local ``counterfact.json``, an http(s) URL, or the cache default."""
    p = resolve_path(path)
    try:
        with open(p, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"counterfact: {p} is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"counterfact: {p} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise BenchmarkError(f"counterfact: {p}: JSON nested too deeply") from None
    if not isinstance(records, list):
        raise BenchmarkError(f"counterfact: {p} must contain a JSON list of records")
    out: list[Example] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BenchmarkError(f"counterfact: {p}: record #{i} is a {type(rec).__name__}, expected an object")
        out.extend(_record_examples(rec, i, str(p)))
    return out
