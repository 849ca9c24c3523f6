"""CounterFact (Meng et al., ROME) as used by the LASER paper.

Each record yields three generative examples sharing one group (the record's ``case_id``): the rewrite
prompt formatted with the subject, and the two paraphrase prompts. The accepted answer is the *true*
fact ``requested_rewrite.target_true.str`` (the scorer prepends the space).

Where the records come from (``benchmark.path``):

* unset: the Hub copy :data:`HUB_REPO` at :data:`HUB_REVISION` through ``datasets`` (its ``train`` and
  ``test`` splits together, in ``case_id`` order: the order of ``counterfact.json``); the dataset commit is
  recorded in the verify report (``benchmark.sources``). A ``counterfact.json`` placed at
  :func:`default_path` (how earlier versions were set up) is used instead when it exists.
* a folder: a local copy of that Hub repo (``hf download --repo-type dataset azhx/counterfact --local-dir DIR``).
* an http(s) URL, e.g. :data:`COUNTERFACT_URL` (rome.baulab.info): downloaded once per full URL into the
  cache, as one network operation with a deadline (``LASER_EXPORT_HUB_TIMEOUT``, see
  :mod:`laser_export.net`); a download shorter than its ``Content-Length`` is never kept.
* a local ``counterfact.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path

from ..atomic import open_atomic
from .base import BenchmarkError, Example, cache_dir

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
#: the Hub copy of rome.baulab.info's counterfact.json (same record schema), and its pinned commit
HUB_REPO = "azhx/counterfact"
HUB_REVISION = "c01c413f856ee38f5c080c9fc5e87aff478e2ff9"
HUB_SPLITS = ("train", "test")


def default_path() -> Path:
    return cache_dir() / "counterfact.json"


def _how_to_get() -> str:
    return (
        f"leave benchmark.path unset to load the Hub copy {HUB_REPO} (needs network or the datasets cache), "
        f"or download it with `curl -L -o {default_path()} {COUNTERFACT_URL}`, "
        f"or pass path={COUNTERFACT_URL!r} (downloaded into {cache_dir()})"
    )


def cache_path(url: str) -> Path:
    """Where ``url`` is cached: keyed by the full URL (two URLs ending in the same file name never
    share an entry): ``~/.cache/laser-export/downloads/<sha256(url)[:16]>/<file name>``."""
    name = Path(urllib.parse.urlparse(url).path).name or "counterfact.json"
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "downloads" / key / name


def download(url: str, *, timeout: float | None = None) -> Path:
    """Download ``url`` into the cache directory (once per URL) and return the local file.

    One network operation with a deadline (``timeout``, default ``LASER_EXPORT_HUB_TIMEOUT`` / 60 s,
    plus credit for the bytes received): a server that stalls or trickles is given up on. The file is
    committed (atomically) only when every byte its ``Content-Length`` announced has arrived."""
    from ..defaults import hub_timeout
    from ..net import deadline, http_client, redact

    dest = cache_path(url)
    if dest.is_file():
        return dest
    seconds = hub_timeout() if timeout is None else timeout
    shown = redact(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with deadline(seconds) as op:
        try:
            _fetch(url, dest, http_client())
        except BenchmarkError:
            raise
        except Exception as exc:  # noqa: BLE001 - httpx2 / OS errors: one line naming the URL
            failure = exc
        else:
            return dest
    why = op.explain(failure) or f": {type(failure).__name__}: {redact(str(failure))}"
    raise BenchmarkError(
        f"counterfact: could not download {shown} into {dest}{why}. "
        "Without network access, fetch the file elsewhere and pass its local path."
    ) from failure


def _fetch(url: str, dest: Path, client) -> None:
    from ..net import redact

    with client, client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as resp:
        if resp.status_code >= 400:
            raise BenchmarkError(f"counterfact: could not download {redact(url)}: HTTP {resp.status_code}")
        expected = resp.headers.get("content-length")
        got = 0
        with open_atomic(dest, "wb") as out:
            for chunk in resp.iter_raw(1 << 20):
                out.write(chunk)
                got += len(chunk)
            if expected is not None and expected.isdigit() and got != int(expected):
                raise BenchmarkError(
                    f"counterfact: download of {redact(url)} is truncated: {got} of the {expected} bytes its "
                    "Content-Length announced; nothing was kept"
                )


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """The local file to read, or None for the Hub copy."""
    if path is None:
        p = default_path()
        return p if p.is_file() else None
    s = str(path)
    if s.startswith(("http://", "https://")):
        return download(s)
    p = Path(s).expanduser()
    if not p.is_file() and not p.is_dir():
        raise BenchmarkError(f"counterfact: file not found: {p}; {_how_to_get()}")
    return p


def hub_records(path: str | os.PathLike | None = None) -> list[dict]:
    """The records of :data:`HUB_REPO` (both splits, ``case_id`` order): through ``datasets`` from the
    Hub at :data:`HUB_REVISION` (``path=None``), or from a local copy of the repo (``path=DIR``)."""
    from .hub import load_rows

    records = []
    for split in HUB_SPLITS:
        try:
            records += load_rows("counterfact", HUB_REPO, None, split, path, HUB_REVISION)
        except BenchmarkError as err:
            raise BenchmarkError(f"{err}; or {_how_to_get()}") from None
    try:
        return sorted(records, key=lambda r: int(r["case_id"]))
    except (KeyError, TypeError, ValueError):
        raise BenchmarkError(f"counterfact: {path or HUB_REPO}: a record has no integer case_id") from None


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
    """Load CounterFact: the Hub copy (``None``), a local copy of it (folder), a local
    ``counterfact.json``, or an http(s) URL (see the module docstring)."""
    p = resolve_path(path)
    if p is None or p.is_dir():
        records, where = hub_records(p), str(p) if p else f"{HUB_REPO}@{HUB_REVISION[:12]}"
    else:
        records, where = _read_json(p), str(p)
    out: list[Example] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BenchmarkError(f"counterfact: {where}: record #{i} is a {type(rec).__name__}, expected an object")
        out.extend(_record_examples(rec, i, where))
    return out


def _read_json(p: Path) -> list:
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
    return records
