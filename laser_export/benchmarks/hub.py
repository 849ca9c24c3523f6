"""Rows of a Hugging Face Hub dataset split: through ``datasets`` when online, or from local files in
the Hub's own layout (offline).

``path=None``: ``datasets.load_dataset(repo, config, split=..., revision=...)`` (network or the
``datasets`` cache). ``path=DIR``: a local copy of the dataset repository, e.g. made with
``hf download --repo-type dataset REPO --local-dir DIR`` (or its ``refs/convert/parquet`` branch).
The files of one split are found by name, in this order:

- ``DIR/[CONFIG/]SPLIT-*.parquet`` or ``DIR/[CONFIG/]data/SPLIT-*.parquet`` (how ``push_to_hub`` names shards),
- ``DIR/[CONFIG/]SPLIT/*.parquet`` (the parquet-converter layout),
- ``DIR/[CONFIG/]SPLIT.jsonl`` / ``SPLIT.json`` (one JSON object per line, or a JSON list),

and read with ``datasets``' own parquet/json builders, so the columns and types are the Hub's.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from pathlib import Path

from .base import BenchmarkError


_RECORDERS: list[list[dict]] = []


@contextlib.contextmanager
def recorded_sources():
    """Collect where every split loaded inside the block came from: ``{"repo", "config", "split",
    "revision", "sha"}`` (the dataset commit resolved on the Hub) for online loads, ``{"repo", "config",
    "split", "files": {path: sha256}}`` for local files. verify puts the list in its report."""
    sources: list[dict] = []
    _RECORDERS.append(sources)
    try:
        yield sources
    finally:
        _RECORDERS.remove(sources)


def _record(entry: dict) -> None:
    for sources in _RECORDERS:
        sources.append(entry)


def _hub_sha(repo: str, revision: str | None) -> str | None:
    from ..defaults import hub_timeout
    from ..net import deadline

    try:
        from huggingface_hub import HfApi

        with deadline(hub_timeout()):
            return HfApi().dataset_info(repo, revision=revision).sha
    except Exception:  # noqa: BLE001 - provenance is best effort; the examples' SHA-256 pins the data anyway
        return None


def _split_files(root: Path, config: str | None, split: str) -> tuple[str, list[str]] | None:
    bases = [root / config, root] if config else [root]
    for base in bases:
        for pattern, kind in (
            (f"{split}-*.parquet", "parquet"),
            (f"data/{split}-*.parquet", "parquet"),
            (f"{split}/*.parquet", "parquet"),
            (f"{split}.parquet", "parquet"),
            (f"{split}.jsonl", "json"),
            (f"{split}.json", "json"),
        ):
            files = sorted(glob.glob(str(base / pattern)))
            if files:
                return kind, files
    return None


def _how_to_get(repo: str, config: str | None) -> str:
    conf = f" (config {config})" if config else ""
    return (
        f"download {repo}{conf} where there is network access, e.g. "
        f"`hf download --repo-type dataset {repo} --local-dir DIR`, and set benchmark.path: DIR"
    )


def load_rows(
    name: str, repo: str, config: str | None, split: str, path: str | os.PathLike | None, revision: str | None = None
) -> list[dict]:
    """The rows of one split as a list of dicts (column -> value)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise BenchmarkError(f"{name}: the `datasets` package is needed (pip install datasets)") from None
    if path is None:
        from ..defaults import hub_timeout
        from ..net import deadline, redact

        with deadline(hub_timeout()) as op:  # one bounded network operation (laser_export/net.py)
            try:
                ds, failure = datasets.load_dataset(repo, config, split=split, revision=revision), None
            except Exception as err:  # noqa: BLE001 - datasets raises many types (ConnectionError, FileNotFoundError, ...)
                failure = err
        if failure is not None:
            first = str(failure).splitlines()[0] if str(failure) else ""
            raise BenchmarkError(redact(
                f"{name}: cannot load {repo} {config or ''} split {split} through datasets "
                f"({type(failure).__name__}: {first}){op.explain(failure)}; offline, {_how_to_get(repo, config)}"
            )) from None
        if _RECORDERS:
            _record({"repo": repo, "config": config, "split": split, "revision": revision, "sha": _hub_sha(repo, revision)})
        return list(ds)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BenchmarkError(f"{name}: benchmark.path {root} is not a folder; {_how_to_get(repo, config)}")
    found = _split_files(root, config, split)
    if found is None:
        where = f"{root}/{config + '/' if config else ''}"
        raise BenchmarkError(
            f"{name}: no files for split {split!r} under {root} (looked for {where}{split}-*.parquet, "
            f"{where}{split}/*.parquet, {where}{split}.jsonl); {_how_to_get(repo, config)}"
        )
    kind, files = found
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files={"rows": files}, split="rows")
    except Exception as err:  # noqa: BLE001
        raise BenchmarkError(f"{name}: cannot read {files[0]}: {type(err).__name__}: {err}") from None
    if _RECORDERS:
        _record({"repo": repo, "config": config, "split": split,
                 "files": {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}})
    return list(ds)


def field(row: dict, key: str, name: str, where: str):
    try:
        return row[key]
    except KeyError:
        raise BenchmarkError(f"{name}: {where}: missing column {key!r} (has {', '.join(row)})") from None
