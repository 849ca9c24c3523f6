"""BigBench JSON tasks read offline from the ``bigbench==1.0.0`` sdist tarball.

No TensorFlow and no ``pip install``: the task's ``task.json`` is read straight out of the tarball
(``pip download --no-deps bigbench==1.0.0 -d ~/.cache/laser-export``) and cached next to it as
``bigbench/<task>.json`` so later loads are instant.

Prompt construction follows BigBench's zero-shot JSON-task formatting
(``task_prefix + example_input_prefix + input + example_output_prefix``, with BigBench's defaults
``"\\nQ: "`` / ``"\\nA: "`` when a key is absent), except that trailing spaces are stripped because
the scorer prepends a space to every answer/choice; without a ``task_prefix`` leading whitespace is
stripped too. So the prompt ends exactly where the answer starts.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from ..atomic import write_bytes
from .base import BenchmarkError, Example, cache_dir

ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
ENV_VAR = "LASER_EXPORT_BIGBENCH"
MEMBER_ROOT = "bigbench/benchmark_tasks/"
HOW_TO_GET = (
    "the bigbench==1.0.0 sdist left PyPI (the index lists only 0.0.1 since late 2026): if you have "
    f"bigbench-1.0.0.tar.gz, put it in ~/.cache/laser-export or point ${ENV_VAR} at it; or pass the task's "
    "task.json from a google/BIG-bench checkout (bigbench/benchmark_tasks/<task>/task.json) as benchmark.path"
)

# benchmark name -> task directory inside bigbench/benchmark_tasks/
TASKS: dict[str, str] = {
    "qa_wikidata": "qa_wikidata",
    "epistemic_reasoning": "epistemic_reasoning",
    "fever": "fact_checker/fever",
}

_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "


def find_archive(path: str | os.PathLike | None = None) -> Path | None:
    """The tarball (or task.json) to read: ``path``, else ``$LASER_EXPORT_BIGBENCH``, else the cache."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    candidate = cache_dir() / ARCHIVE_NAME
    return candidate if candidate.is_file() else None


def _cache_file_for(archive: Path, task: str) -> Path:
    return archive.parent / "bigbench" / f"{task}.json"


def _writable_cache_file(archive: Path, task: str) -> list[Path]:
    return [_cache_file_for(archive, task), cache_dir() / "bigbench" / f"{task}.json"]


def _cache_is_fresh(cache: Path, archive: Path) -> bool:
    try:
        return cache.is_file() and cache.stat().st_mtime >= archive.stat().st_mtime
    except OSError:
        return False


def _write_atomic(dest: Path, data: bytes) -> bool:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(dest, data)
        return True
    except OSError:
        return False


def _extract_tasks(archive: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """One pass over the tarball, returning {task: task.json bytes} for every wanted task found."""
    suffixes = {f"{MEMBER_ROOT}{rel}/task.json": task for task, rel in wanted.items()}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                for suffix, task in suffixes.items():
                    if task not in found and member.name.endswith(suffix):
                        fobj = tar.extractfile(member)
                        assert fobj is not None
                        found[task] = fobj.read()
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BenchmarkError(f"bigbench: cannot read archive {archive}: {exc}") from exc
    return found


def read_task_json(task: str, path: str | os.PathLike | None = None) -> dict:
    """Return the parsed ``task.json`` for one of :data:`TASKS`, using/creating the extracted cache."""
    if task not in TASKS:
        raise BenchmarkError(f"bigbench: unknown task {task!r}; known: {', '.join(TASKS)}")
    archive = find_archive(path)
    if archive is None:
        raise BenchmarkError(
            f"{task}: BigBench archive not found (looked for ${ENV_VAR} and {cache_dir() / ARCHIVE_NAME}); {HOW_TO_GET}"
        )
    if not archive.is_file():
        raise BenchmarkError(f"{task}: BigBench file not found: {archive}; {HOW_TO_GET}")
    if archive.suffix == ".json":
        raw = archive.read_bytes()
    else:
        raw = None
        for cache in _writable_cache_file(archive, task):
            if _cache_is_fresh(cache, archive):
                raw = cache.read_bytes()
                break
        if raw is None:
            # Extract every known task in the same pass: reading the gzip stream is the slow part.
            found = _extract_tasks(archive, TASKS)
            if task not in found:
                raise BenchmarkError(
                    f"{task}: {archive} has no member .../{MEMBER_ROOT}{TASKS[task]}/task.json; "
                    f"is it the bigbench-1.0.0 sdist? {HOW_TO_GET}"
                )
            for name, data in found.items():
                for cache in _writable_cache_file(archive, name):
                    if _write_atomic(cache, data):
                        break
            raw = found[task]
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{task}: task.json from {archive} is not valid JSON: {exc}") from exc


def parse_task(data: dict, task: str, source: str = "task.json") -> list[Example]:
    """Turn a BigBench JSON task into examples (generative for ``target``, choice for ``target_scores``)."""
    try:
        raw_examples = data["examples"]
    except (KeyError, TypeError):
        raise BenchmarkError(f"{task}: {source} has no 'examples' list") from None
    task_prefix = str(data.get("task_prefix", ""))
    in_prefix = data.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    out_prefix = data.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    out: list[Example] = []
    for i, ex in enumerate(raw_examples):
        where = f"{task}: {source}: example #{i}"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise BenchmarkError(f"{where} has no string 'input'")
        prompt = in_prefix + ex["input"] + out_prefix
        prompt = task_prefix + prompt if task_prefix else prompt.lstrip()
        prompt = prompt.rstrip(" ")
        ex_id = f"{task}:{ex['id']}" if "id" in ex else f"{task}:{i}"
        if "target_scores" in ex:
            scores = ex["target_scores"]
            if not isinstance(scores, dict) or not scores:
                raise BenchmarkError(f"{where}: 'target_scores' must be a non-empty object")
            choices = tuple(str(c) for c in scores)
            values = [float(v) for v in scores.values()]
            label = max(range(len(values)), key=values.__getitem__)
            out.append(
                Example(id=ex_id, prompt=prompt, answers=(choices[label],), choices=choices, label=label)
            )
        elif "target" in ex:
            target = ex["target"]
            answers = (target,) if isinstance(target, str) else tuple(target)
            if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise BenchmarkError(f"{where}: 'target' must be a non-empty string or list of strings")
            out.append(Example(id=ex_id, prompt=prompt, answers=answers))
        else:
            raise BenchmarkError(f"{where} has neither 'target' nor 'target_scores'")
    return out


def load(task: str, path: str | os.PathLike | None = None) -> list[Example]:
    """Load one BigBench task; ``path`` is the sdist tarball or the task's ``task.json``."""
    source = str(find_archive(path) or task)
    return parse_task(read_task_json(task, path), task, source)
